"""``loopdb eval``: lm-evaluation-harness tasks at several loop counts, one lm-eval run per K, into
one JSON report, a plot against K and the run's tensorboard. Offline unless a task needs the hub."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import EvalError
from .lm_eval_model import LoopDBLM

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"
STDERR_BOOTSTRAP_ITERS = 1000


def local_task_dirs(include_paths=()) -> list[Path]:
    dirs = [TASKS_DIR] if TASKS_DIR.is_dir() else []
    for raw in include_paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise EvalError(f"--include-path {raw}: no such folder")
        dirs.append(path)
    return dirs


def task_manager_for(tasks: list[str], include_paths=()):
    """An offline TaskManager (our tasks + --include-path folders) unless a built-in task is asked for."""
    from lm_eval.tasks import TaskManager

    dirs = local_task_dirs(include_paths)
    local = TaskManager(include_path=[str(d) for d in dirs] or None, include_defaults=False)
    missing = [name for name in tasks if name not in local.all_tasks]
    if not missing:
        return local
    available = ", ".join(local.all_subtasks) or "none"
    full = TaskManager(include_path=[str(d) for d in dirs] or None, include_defaults=True)
    unknown = [name for name in missing if name not in full.all_tasks]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; local tasks: {available} "
                        "(add folders with --include-path; lm-eval's own task names work too, with the hub)")
    return full


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def metric_values(results: dict, stderr: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from an lm-eval results dict (numbers only); with ``stderr``, the
    standard errors instead (only the metrics the harness gives one for)."""
    table = {}
    for task, values in (results.get("results") or {}).items():
        row = {}
        for key, value in values.items():
            if "," not in key or ("_stderr," in key) != stderr:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.replace("_stderr,", ",").split(",", 1)
            row[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        table[task] = row
    return table


def jsonable(value):
    """A JSON-safe copy: str keys, lists for tuples/sets, plain numbers, None for NaN/inf, repr for the rest."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def format_table(summary: dict, loops: list[int], stderrs: dict | None = None) -> str:
    """Markdown table: one row per task/metric, one column per loop count (value ± stderr if known)."""
    lines = ["| task | metric | " + " | ".join(f"K={k}" for k in loops) + " |",
             "|---|---|" + "---|" * len(loops)]
    for task, metrics in summary.items():
        for metric, by_loops in metrics.items():
            cells = []
            for k in loops:
                cell = _fmt(by_loops.get(str(k)))
                error = ((stderrs or {}).get(task, {}).get(metric) or {}).get(str(k))
                cells.append(cell if error is None else f"{cell} ± {_fmt(error)}")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PER_DIFFICULTY = re.compile(r"^(?P<base>.+)_d(?P<difficulty>\d+)$")  # e.g. exact_match_d12 (loopdb.tasks folders)
BOUNDED = ("acc", "exact_match")  # metrics in [0, 1]: drawn on a 0-1 axis, so a small change looks small


def metric_panels(summary: dict) -> list[tuple]:
    """The panels of the plot, (task, metric, by_loops, by_difficulty): a metric also reported per
    difficulty (``metric_dN``) is ONE panel of the metric against difficulty with a line per K
    (by_difficulty: {difficulty: {K: value}}); every other metric is a panel against K (None)."""
    panels = []
    for task, metrics in summary.items():
        per_difficulty = {}
        for metric, by_loops in metrics.items():
            match = PER_DIFFICULTY.match(metric)
            if match and match["base"] in metrics:
                per_difficulty.setdefault(match["base"], {})[int(match["difficulty"])] = by_loops
        for metric, by_loops in metrics.items():
            match = PER_DIFFICULTY.match(metric)
            if not (match and match["base"] in per_difficulty):
                panels.append((task, metric, by_loops, per_difficulty.get(metric)))
    return panels


def plot_metrics(summary: dict, loops: list[int], path: Path) -> Path:
    """One panel per task/metric against the loop count (log2 axis), or, for a metric reported per
    difficulty, against difficulty with one line per K; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = metric_panels(summary)
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.4 * rows), squeeze=False)
    for axis, (task, metric, by_loops, by_difficulty) in zip(axes.flat, panels):
        if by_difficulty:
            difficulties = sorted(by_difficulty)
            for k in loops:
                xs = [d for d in difficulties if by_difficulty[d].get(str(k)) is not None]
                overall = by_loops.get(str(k))
                label = f"K={k}" + (f" (all: {overall:.3f})" if overall is not None else "")
                axis.plot(xs, [by_difficulty[d][str(k)] for d in xs], marker="o", markersize=3, label=label)
            axis.set_xlabel("difficulty")
            axis.legend(fontsize=7)
        else:
            xs = [k for k in loops if by_loops.get(str(k)) is not None]
            ys = [by_loops[str(k)] for k in xs]
            axis.plot(xs, ys, marker="o")
            axis.set_xscale("log", base=2)
            axis.set_xticks(loops, [str(k) for k in loops])
            if "perplexity" in metric and ys and min(ys) > 0:
                axis.set_yscale("log")
            axis.set_xlabel("loops K")
        if metric.startswith(BOUNDED):
            axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"{task}\n{metric}", fontsize=9)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _checkpoint_step(run) -> int:
    from ..runs.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run)
    match = re.search(r"(\d+)$", checkpoint.name) if checkpoint is not None else None
    return int(match.group(1)) if match else 0


def log_tensorboard(run, summary: dict, step: int) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    path = Path(run) / "tb"
    writer = SummaryWriter(str(path))
    for task, metrics in summary.items():
        for metric, by_loops in metrics.items():
            for loops, value in by_loops.items():
                if value is not None:
                    writer.add_scalar(f"eval/{task}/{metric}@{loops}", value, step)
    writer.close()
    return path


def run_eval(run, tasks: list[str], loops: list[int], output, include_paths=(), limit=None, batch_size=16,
             samples=4, seed=0, stderr=False, device="cpu", lm=None, tensorboard=True, say=None,
             readout="predictive", exit=None) -> dict:
    """Evaluate ``run`` on ``tasks`` once per loop count; write the JSON, the PNG and tensorboard.

    Returns the report written to ``output``: {"loops": {"K": lm-eval results}, "summary":
    {task: {metric: {"K": value}}}, ...}. ``lm`` replaces loading ``run`` (tests).
    """
    from lm_eval import simple_evaluate

    say = say or (lambda message: print(message, file=sys.stderr))
    if not tasks:
        raise EvalError("--tasks is empty; name at least one task")
    if not loops or min(loops) < 1:
        raise EvalError("every loop count must be >= 1")
    output = Path(output)
    manager = task_manager_for(tasks, include_paths)
    try:  # build every task once up front: data problems (e.g. the hub offline) surface here
        manager.load(list(tasks))
    except Exception as error:  # the harness's own error, reported in one line
        raise EvalError(f"could not load task(s) {', '.join(tasks)}: {_one_line(error)}") from error
    if lm is None:
        lm = LoopDBLM(run=run, num_loops=loops[0], samples=samples, seed=seed, batch_size=batch_size, device=device,
                      readout=readout, exit=exit)
    by_loops, summary, stderrs, mean_loops = {}, {}, {}, {}
    for num_loops in loops:
        lm.num_loops = num_loops
        lm.generation_loops = []
        say(f"loopdb eval: K={num_loops} ({', '.join(tasks)})")
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  bootstrap_iters=STDERR_BOOTSTRAP_ITERS if stderr else 0, log_samples=False,
                                  batch_size=lm.batch_size)
        by_loops[str(num_loops)] = jsonable(results)
        if lm.generation_loops:  # sequence-recurrent generation: the loops its tokens used
            mean_loops[str(num_loops)] = sum(lm.generation_loops) / len(lm.generation_loops)
        for target, errors in ((summary, False), (stderrs, True)):
            for task, metrics in metric_values(results, stderr=errors).items():
                for metric, value in metrics.items():
                    target.setdefault(task, {}).setdefault(metric, {})[str(num_loops)] = value
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_metrics(summary, loops, output.with_suffix(".png"))
    report = {"loops": by_loops, "summary": summary, "summary_stderr": stderrs if stderr else None,
              "run": None if run is None else str(run), "tasks": list(tasks), "readout": lm.readout,
              "samples": lm.samples, "seed": lm.seed, "limit": limit, "plot": str(plot),
              "exit": None if lm.exit_rule is None else str(lm.exit_rule), "mean_loops": mean_loops or None}
    output.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    if tensorboard and run is not None:
        report["tensorboard"] = str(log_tensorboard(run, summary, _checkpoint_step(run)))
    report["table"] = format_table(summary, loops, stderrs if stderr else None)
    return report
