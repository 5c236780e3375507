"""The members of a comparison or a study: each trained in its own process (so its peak resident
memory is its own) for a training time or a number of steps, then scored at every loop count.
A finished member is not retrained when the command runs again, so an interrupted comparison
or study resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ..data.storage import load_tokenizer, load_tokens
from ..data.windows import eval_windows
from ..names import LOOP_FREE_READOUTS, TASK_READOUTS
from ..readouts.scoring import bits_per_byte
from ..runs.folder import load_model, run_data_dir
from ..sampling import sampler_of

def train_member(run: Path, preset: str, data_dir: Path, budget_minutes: float | None, steps: int | None,
                 overrides: list[str], budget_clock: str = "wall") -> dict:
    """Train one run in its own process (so its peak memory is its own) unless it already finished;
    an interrupted member resumes from its last checkpoint. Neither budget: the preset's own steps.
    Returns its train_summary.json."""
    summary_path = run / "train_summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    limit = ([f"--max_steps={steps}"] if steps else [f"--time_budget_minutes={budget_minutes}",
                                                     f"--time_budget_clock={budget_clock}"] if budget_minutes else [])
    command = [sys.executable, "-m", "loopdb", "train", "--preset", preset, "--data", str(data_dir),
               "--out", str(run), "--quiet", *limit, "--eval_every=1000000000", "--eval_loops=1", *overrides]
    if (run / "latest").exists():
        command.append("--resume")
    print(f"[loopdb] training {run.name}: {' '.join(command[3:])}", file=sys.stderr)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise RuntimeError(f"training {run.name} failed (exit {result.returncode}); its run folder is {run}")
    return json.loads(summary_path.read_text())


def score_member(run: Path, loops, samples: int, max_windows: int | None, seed: int, device="cpu",
                 readout: str = "predictive", split: str = "test", sampler: dict | None = None) -> dict:
    """bits per byte of a run's newest model at each loop count (dense: K = 1 only); ``sampler`` overrides
    inference-only settings (see runs.folder.load_model). A reasoning-task run is scored by final-answer
    accuracy instead (readout ``accuracy``: the trained difficulties; ``accuracy_beyond``: the harder
    ones; ``max_windows``: examples per difficulty)."""
    model, config = load_model(run, device, sampler)
    if config.train.task:
        return _task_scores(run, model, config, loops, samples, max_windows, seed, device, readout, split)
    data_dir = run_data_dir(run)
    tokens = load_tokens(data_dir, split)
    token_bytes = torch.as_tensor(load_tokenizer(data_dir).token_bytes)
    windows = eval_windows(tokens, config.model.context, max_windows)
    counts = loop_counts(model, loops, readout)
    if readout == "block_elbo":  # one pass per K over the L-token blocks of a drafting run
        from ..readouts.drafting import block_elbo_bits_per_byte

        bounds = block_elbo_bits_per_byte(model, windows, token_bytes, counts, samples, seed, device=device)
        print(f"[loopdb] {run.name} block_elbo: " + ", ".join(f"K={k} {v:.4f}" for k, v in
                                                             bounds["block_elbo"].items()), file=sys.stderr)
        return {str(k): v for k, v in bounds["block_elbo"].items()}
    results = {}
    for num_loops in counts:
        results[str(num_loops)] = bits_per_byte(model, windows, token_bytes, num_loops, samples=samples,
                                                       seed=seed, device=device, readout=readout)
        print(f"[loopdb] {run.name} {readout} K={num_loops}: {results[str(num_loops)]:.4f} bpb", file=sys.stderr)
    return results


def loop_counts(model, loops, readout: str) -> tuple:
    """The loop counts a readout of ``model`` is scored at: K = 1 only where K changes nothing."""
    return tuple(loops) if sampler_of(model).has_loops and readout not in LOOP_FREE_READOUTS else (1,)


def _task_scores(run, model, config, loops, samples, max_windows, seed, device, readout, split) -> dict:
    from ..readouts.reasoning import evaluation_difficulties, evaluation_examples, task_accuracy, within_training
    from ..tasks import get_task

    if readout not in TASK_READOUTS:
        raise ValueError(f"a task run is scored by {' or '.join(TASK_READOUTS)}, not {readout}")
    task = get_task(config.train.task)
    wanted = [d for d in evaluation_difficulties(config.train)
              if within_training(d, config.train) == (readout == "accuracy")]
    examples = evaluation_examples(task, split, wanted, max_windows or config.train.eval_examples)
    results = {}
    for num_loops in loops if sampler_of(model).has_loops else (1,):
        results[str(num_loops)] = task_accuracy(model, task, examples, num_loops, samples, seed, device=device)["accuracy"]
        print(f"[loopdb] {run.name} {readout} K={num_loops}: {results[str(num_loops)]:.3f}", file=sys.stderr)
    return results
