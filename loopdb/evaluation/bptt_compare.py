"""loopdb's sequence-recurrent BPTT against the minimal Huginn model (loopdb.evaluation.minimal_recurrent):
the same task, the same number of updates (or seconds), one thread each, scored by one scorer.

    python -m loopdb.evaluation.bptt_compare --steps 1000                  # both sides at once, side by side
    python -m loopdb.evaluation.bptt_compare --side loopdb --steps 1000 --set lr=1e-3 --set batch_size=64
    python -m loopdb.evaluation.bptt_compare --side minimal --steps 1000 --minimal positions=rotary

loopdb's side is its real trainer step (``--preset depth-tiny`` with ``--set`` overrides; by default
batch 128 and lr 2e-3 as the minimal model); accuracy per K is the final answer over the trained
difficulties 2..12 and over every supervised position, on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time

import torch

from ..readouts.scoring import initial_noise, loop_logits
from ..config import preset
from ..training.trainer import Trainer
from .minimal_recurrent import MinimalSettings, task_scores, train_minimal

LOOPS = (1, 2, 4, 8, 16)
DIFFICULTIES = tuple(range(2, 13))
LOOPDB_DEFAULTS = {"batch_size": "128", "lr": "2e-3"}  # the minimal model's batch and lr


def run_loopdb(overrides: dict, steps: int, seconds: float, count: int, preset_name: str = "depth-tiny") -> dict:
    config = preset(preset_name).apply_overrides({**LOOPDB_DEFAULTS, **overrides})
    if steps > 0:
        config.train.max_steps = steps  # the lr schedule ends where the run ends
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, None, run_dir, progress=False, log_tensorboard=False)
        start = time.perf_counter()
        while (steps <= 0 or trainer.step < steps) and (seconds <= 0 or time.perf_counter() - start < seconds):
            stats = trainer.train_step()
            if trainer.step % 100 == 0:  # progress on stderr: the loss curve of a long comparison
                print(f"loopdb step {trainer.step} loss {stats['loss']:.4f}", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - start
    model = trainer.model.eval()
    generator = torch.Generator().manual_seed(0)

    def logits_at(inputs, loops):
        context = model.encode(inputs)
        state = initial_noise(model, (*inputs.shape, model.config.d_model), loops, generator, inputs.device)
        return loop_logits(model, context, state, loops, generator)

    return {"updates": trainer.step, "seconds": elapsed, "parameters": model.num_parameters(),
            "scores": task_scores(logits_at, config.train.task, DIFFICULTIES, count, LOOPS,
                                  start_token=config.model.start_token)}


def run_minimal(overrides: dict, steps: int, seconds: float, count: int) -> dict:
    fields = {f.name: f.type for f in dataclasses.fields(MinimalSettings)}
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise SystemExit(f"unknown minimal setting {key!r}; known: {', '.join(fields)}")
        kind = type(getattr(MinimalSettings(), key))
        if kind is bool and raw.lower() not in ("true", "false"):
            raise SystemExit(f"minimal setting {key} is true or false, got {raw!r}")
        values[key] = raw if kind is str else raw.lower() == "true" if kind is bool else kind(raw)
    settings = MinimalSettings(**values)
    model, updates, elapsed = train_minimal(settings, steps=steps, seconds=seconds,
                                            log=lambda line: print(line, file=sys.stderr, flush=True))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    scores = task_scores(lambda inputs, loops: model(inputs, loops, generator), "s3", DIFFICULTIES, count, LOOPS,
                         start_token=settings.start_token)
    return {"updates": updates, "seconds": elapsed, "parameters": sum(p.numel() for p in model.parameters()),
            "scores": scores}


def _pairs(items) -> dict:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set/--minimal take key=value, got {item!r}")
        pairs[key] = value
    return pairs


def _row(name: str, result: dict) -> str:
    cells = " | ".join(f"{result['scores'][str(k)]['final']:.3f}" for k in LOOPS)
    rate = result["updates"] / max(result["seconds"], 1e-9)
    return f"| {name} | {result['updates']} ({rate:.2f}/s) | {cells} |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=("both", "loopdb", "minimal"), default="both")
    parser.add_argument("--steps", type=int, default=0, help="updates per side")
    parser.add_argument("--seconds", type=float, default=0.0, help="wall-clock per side (with --steps: the first reached)")
    parser.add_argument("--set", action="append", help="loopdb config override key=value (repeatable)")
    parser.add_argument("--minimal", action="append", help="minimal model setting key=value (repeatable)")
    parser.add_argument("--preset", default="depth-tiny")
    parser.add_argument("--count", type=int, default=100, help="test examples per difficulty (2..12)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps <= 0 and args.seconds <= 0:
        parser.error("give --steps or --seconds")
    torch.set_num_threads(args.threads)
    if args.side == "loopdb":
        print(json.dumps(run_loopdb(_pairs(args.set), args.steps, args.seconds, args.count, args.preset)))
        return
    if args.side == "minimal":
        print(json.dumps(run_minimal(_pairs(args.minimal), args.steps, args.seconds, args.count)))
        return
    # both: two processes side by side, one thread each, so updates/s compare under the same load
    common = [sys.executable, "-m", "loopdb.evaluation.bptt_compare", "--steps", str(args.steps), "--seconds",
              str(args.seconds), "--count", str(args.count), "--threads", "1"]
    loopdb_args = ["--side", "loopdb", "--preset", args.preset] + [a for s in args.set or [] for a in ("--set", s)]
    minimal_args = ["--side", "minimal"] + [a for s in args.minimal or [] for a in ("--minimal", s)]
    processes = {name: subprocess.Popen(common + extra, stdout=subprocess.PIPE, text=True)
                 for name, extra in (("loopdb", loopdb_args), ("minimal", minimal_args))}
    results = {}
    for name, process in processes.items():
        output, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"the {name} side failed (exit {process.returncode})")
        results[name] = json.loads(output.strip().splitlines()[-1])
    print("| model | updates | " + " | ".join(f"K={k}" for k in LOOPS) + " |")
    print("|---|---|" + "---|" * len(LOOPS))
    for name, result in results.items():
        print(_row(name, result))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
