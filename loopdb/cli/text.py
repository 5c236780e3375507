"""`loopdb score` and `loopdb sample` for the next-token language models (families looped, stacked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.storage import load_meta, load_tokenizer, load_tokens
from ..data.tokenizers import opened_prompt
from ..data.windows import eval_windows
from ..device import resolve_device
from ..errors import UsageError
from ..maths.exit import parse_exit
from ..readouts import generation
from ..readouts.scoring import bits_per_byte
from ..runs.folder import load_model, run_data_dir
from .args import parse_loops


def sampler_settings(config) -> dict:
    """The inference settings a score depends on (loopdb.runs.folder.SAMPLER_KEYS), as the run uses them."""
    from ..runs.folder import SAMPLER_KEYS

    return {key: getattr(config.diffusion, key) for key in SAMPLER_KEYS}


def _describe(settings: dict) -> str:
    return "sampler " + " ".join(f"{key}={value}" for key, value in settings.items())


def score(args, sampler) -> int:
    """`loopdb score` of a next-token LM: bits per byte per loop count under a readout."""
    if args.readout == "block_elbo":  # a drafting run's bound on whole blocks (loopdb.cli.drafting)
        from .drafting import score_block_elbo

        return score_block_elbo(args, sampler)
    loops = parse_loops(args.loops or "1,4,16")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: need at least one noise draw")
    device = resolve_device(args.device)
    model, config = load_model(args.run, device, sampler)
    if config.train.task:
        return _score_task(args, model, config, loops, device)
    if args.exit:
        raise UsageError("--exit applies to runs on a reasoning task (bits-per-byte scoring runs every loop)")
    data_dir = run_data_dir(args.run)
    tokens = load_tokens(data_dir, args.split)
    token_bytes = torch.as_tensor(load_tokenizer(data_dir).token_bytes)
    windows = eval_windows(tokens, config.model.context, args.max_windows)
    results = {}
    for num_loops in loops:
        with tqdm(total=len(windows), desc=f"score K={num_loops}", disable=args.json or args.quiet,
                  leave=False) as bar:
            try:
                results[str(num_loops)] = bits_per_byte(
                    model, windows, token_bytes, num_loops, samples=args.samples, seed=args.seed,
                    batch_size=args.batch_size, device=device, progress=bar, readout=args.readout)
            except ValueError as error:  # e.g. the ELBO of a model that is not a diffusion model
                raise UsageError(str(error)) from None
    meta = load_meta(data_dir)
    report = {"bpb": results, "readout": args.readout, "samples": args.samples, "split": args.split,
              "seed": args.seed, "windows": len(windows), "unigram_bpb": meta["unigram_test_bpb"],
              "sampler": sampler_settings(config)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.split} bits per byte ({args.readout}, {args.samples} noise draw(s), {len(windows)} windows, "
              f"{_describe(sampler_settings(config))}):")
        for num_loops, value in results.items():
            print(f"  K={num_loops:>3}  {value:.4f}")
        print(f"  unigram (test) {meta['unigram_test_bpb']:.4f}")
    return 0


def _score_task(args, model, config, loops, device) -> int:
    """A reasoning-task run: final-answer accuracy per K, per difficulty, and the loops used."""
    from ..readouts.reasoning import (evaluation_difficulties, evaluation_examples, step_accuracy, task_accuracy,
                                      within_training)
    from ..sampling import JOINT, sampler_of
    from ..tasks import get_task

    task = get_task(config.train.task)
    exit_rule = parse_exit(args.exit)
    count = args.max_windows or config.train.eval_examples  # --max-windows caps the examples per difficulty
    examples = evaluation_examples(task, args.split, evaluation_difficulties(config.train), count)
    trained = {d for d in evaluation_difficulties(config.train) if within_training(d, config.train)}
    report = {"accuracy": {}, "accuracy_beyond": {}, "accuracy_by_difficulty": {}, "mean_loops": {},
              "task": task.name, "split": args.split, "exit": None if exit_rule is None else str(exit_rule),
              "objective": config.train.objective, "recurrence": config.recurrence, "samples": args.samples,
              "sampler": sampler_settings(config), "examples_per_difficulty": count, "trained_difficulties": sorted(trained),
              "baselines": task.baselines([e for e in examples if e.difficulty in trained])}
    for num_loops in tqdm(loops, desc="score", disable=args.json or args.quiet, leave=False):
        try:
            result = task_accuracy(model, task, examples, num_loops, args.samples, args.seed, exit_rule,
                                   device=device)
        except ValueError as error:  # e.g. a gate exit for a model without an exit gate
            raise UsageError(str(error)) from None
        by_difficulty = result["by_difficulty"]
        seen = [by_difficulty[d] for d in by_difficulty if d in trained]
        beyond = [by_difficulty[d] for d in by_difficulty if d not in trained]
        key = str(num_loops)
        report["accuracy"][key] = sum(seen) / len(seen)
        report["accuracy_beyond"][key] = sum(beyond) / len(beyond) if beyond else None
        report["accuracy_by_difficulty"][key] = {str(d): value for d, value in by_difficulty.items()}
        report["mean_loops"][key] = result["mean_loops"]
    trained_examples = [e for e in examples if e.difficulty in trained]
    if sampler_of(model) is JOINT and trained_examples:  # one denoiser call from resolved predecessors: the step
        report["step_accuracy"] = step_accuracy(model, task, trained_examples, args.seed, device=device)
    _log_task_scores(args.run, report, args.split)
    if args.plot:
        _plot_task_scores(report, args.plot)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.split} accuracy on {task.name} ({count} examples per difficulty, objective {config.train.objective}, "
          f"recurrence {config.recurrence}, {_describe(report['sampler'])}"
          f"{', exit ' + str(exit_rule) if exit_rule else ''}):")
    for key in report["accuracy"]:
        beyond = report["accuracy_beyond"][key]
        print(f"  K={key:>3}  trained {report['accuracy'][key]:.3f}"
              + (f"   beyond {beyond:.3f}" if beyond is not None else "") + f"   mean loops {report['mean_loops'][key]:.2f}")
    print("  shortcuts (trained): " + "  ".join(f"{name} {value:.3f}" for name, value in report["baselines"].items()))
    if "step_accuracy" in report:
        step = report["step_accuracy"]
        print(f"  one step from resolved earlier answers (trained): {step['mean']:.3f}; by answer "
              + " ".join(f"{value:.2f}" for value in step["by_answer"])
              + f"; chained from its own answers, one call each: {step['chained']:.3f}")
    return 0


def _log_task_scores(run, report: dict, split: str) -> None:
    """Accuracy against K per difficulty in the run's tensorboard (x axis: the loop count)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(run) / "tb"))
    tag = f"{split}_by_loops" + (f"_exit_{report['exit']}" if report["exit"] else "")
    for loops, by_difficulty in report["accuracy_by_difficulty"].items():
        for difficulty, value in by_difficulty.items():
            writer.add_scalar(f"{tag}/accuracy_d{int(difficulty):02d}", value, int(loops))
        writer.add_scalar(f"{tag}/accuracy_trained", report["accuracy"][loops], int(loops))
    writer.close()


def _plot_task_scores(report: dict, path) -> None:
    """Accuracy against K: the trained and harder difficulties' means and up to 8 single difficulties."""
    from ..evaluation.plots import plot_against_loops

    difficulties = sorted({int(d) for values in report["accuracy_by_difficulty"].values() for d in values})
    shown = difficulties[::max(1, len(difficulties) // 8)][:8]
    curves = {f"difficulty {d}": {int(k): v[str(d)] for k, v in report["accuracy_by_difficulty"].items()}
              for d in shown}
    curves["trained (mean)"] = {int(k): v for k, v in report["accuracy"].items()}
    if any(v is not None for v in report["accuracy_beyond"].values()):
        curves["beyond training (mean)"] = {int(k): v for k, v in report["accuracy_beyond"].items()}
    plot_against_loops(curves, path, f"{report['split']} accuracy", log_scale=False,
                       title=f"{report['task']}: {report['objective']}, recurrence {report['recurrence']}"
                             + (f", exit {report['exit']}" if report["exit"] else ""))
    print(f"wrote {path}", file=sys.stderr)


def sample(args, sampler) -> int:
    """`loopdb sample` of a next-token LM: K loops per new token."""
    if getattr(args, "speculative", False) or getattr(args, "parallel", False):  # drafting runs (loopdb.cli.drafting)
        from .drafting import sample_drafts

        return sample_drafts(args, sampler)
    if args.loops is not None and args.loops < 1:
        raise UsageError(f"--loops {args.loops}: the loop count must be >= 1")
    model, config = load_model(args.run, resolve_device(args.device), sampler)
    if args.loops is None:
        args.loops = config.model.num_blocks if config.model.family == "stacked" else 4
    tokenizer = load_tokenizer(run_data_dir(args.run))
    prompt = opened_prompt(tokenizer.encode(args.prompt), tokenizer.newline_id, config.model.start_token)
    new_tokens = 100 if args.max_new_tokens is None else args.max_new_tokens
    stats = {}
    try:
        ids = generation.generate(model, prompt, new_tokens, args.loops, temperature=args.temperature,
                                  top_k=args.top_k or None, seed=args.seed, exit_rule=parse_exit(args.exit),
                                  last_cache_only=args.last_loop_cache, stats=stats)
    except ValueError as error:  # an exit or cache option the model does not have
        raise UsageError(str(error)) from None
    print(args.prompt + tokenizer.decode(ids))
    if "mean_loops" in stats:
        print(f"mean loops per token {stats['mean_loops']:.2f}; cache {stats['cache_bytes'] / 1e6:.2f} MB",
              file=sys.stderr)
    return 0
