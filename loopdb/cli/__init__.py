"""The ``loopdb`` command line: prepare, train, score, sample, eval, compare, study, bench.

Any user error (unknown preset or key, missing run folder, K < 1, bad data)
prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import LoopdbError, UsageError
from .args import check_flag_minimums, parse_loops, parse_overrides

USER_ERROR = 2


# -- commands ------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    from ..data.preparation import prepare

    corpus = None if args.corpus in (None, ["shakespeare"]) else args.corpus
    streaming = {key: getattr(args, key) for key in ("workers", "tokenizer_sample_mb", "shard_mb", "chunk_mb")
                 if getattr(args, key) is not None}  # unset: loopdb.data.preparation's defaults
    meta = prepare(args.out, corpus=corpus, vocab_size=args.vocab_size, tokenizer=args.tokenizer, **streaming)
    splits = meta["splits"]
    print(f"prepared {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), tokens "
          + ", ".join(f"{name} {splits[name]['tokens']:,} ({len(splits[name]['shards'])} shard(s))"
                      for name in ("train", "val", "test")))
    print(f"unigram test bits per byte (the no-context line): {meta['unigram_test_bpb']:.3f}")
    return 0


def run_commands(run):
    """The CLI module whose score/sample commands read this run (its family's ``commands``)."""
    from ..families import family_of
    from ..runs.folder import open_run
    from . import images, masked, text

    return {"text": text, "masked": masked, "images": images}[family_of(open_run(run)[0]).commands]


def cmd_train(args, overrides) -> int:
    from ..config import preset
    from ..families import check_config, family_of
    from ..training.trainer import Trainer

    config = check_config(preset(args.preset).apply_overrides(overrides))  # before any data preparation
    data_dir = family_of(config).data_dir(args.data, config)
    trainer = Trainer(config, data_dir, args.out, resume=args.resume, progress=not args.quiet,
                      block_parallel=args.block_parallel)
    main_rank = trainer.group.is_main
    if main_rank:
        print(f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters on {trainer.device}; "
              f"run folder {args.out}", file=sys.stderr)
    try:
        results = trainer.train()
    except KeyboardInterrupt:
        print(f"stopped at step {trainer.step}; continue with: loopdb train --preset {args.preset} --out {args.out} "
              "--resume", file=sys.stderr)
        return 130
    if main_rank:
        print(json.dumps({"step": trainer.step, **results}))
    return 0


def check_budget(args) -> None:
    """compare / study: exactly one of --budget-minutes M > 0 or --steps N >= 1."""
    if (args.budget_minutes is None) == (args.steps is None):
        raise UsageError("give exactly one of --budget-minutes M (equal time) or --steps N (equal steps)")
    if (args.budget_minutes is not None and args.budget_minutes <= 0) or (args.steps is not None and args.steps < 1):
        raise UsageError("--budget-minutes must be > 0 and --steps >= 1")


def cmd_compare(args, overrides) -> int:
    from ..evaluation.compare import run_compare
    from ..config import preset

    check_budget(args)
    from ..data.preparation import resolve_data_dir

    loops = parse_loops(args.loops)
    config = preset(args.preset).apply_overrides(overrides)  # fail fast on bad keys, before any training
    data_dir = resolve_data_dir(args.data, config.train.data_vocab_size)
    results = run_compare(args.preset, args.out, data_dir, args.budget_minutes, args.steps, loops, args.samples,
                          args.max_windows, args.seed, [f"--{k}={v}" for k, v in overrides.items()])
    print((Path(args.out) / "results.md").read_text())
    print(f"DiffusionBlocks step / BPTT step = {results['step_ratio_diffusion_vs_bptt']:.3f}")
    return 0


def cmd_eval(args) -> int:
    """lm-evaluation-harness tasks at several loop counts (loopdb.harness); offline by default."""
    import logging

    from ..runs.folder import open_run

    loops = parse_loops(args.loops)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise UsageError("--tasks: name at least one task, e.g. shakespeare_bpb,shakespeare_cloze")
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    config, _ = open_run(args.run)  # a missing or empty run folder fails here, before any task is built
    if config.model.family != "looped":
        raise UsageError(f"loopdb eval runs looped-family models; {args.run} is family {config.model.family} "
                         "(use loopdb score)")
    try:
        from ..evaluation import harness
    except ImportError as error:
        raise UsageError(str(error)) from None
    if not args.verbose:  # the harness's and the hub client's chatter; errors still show
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub configures its logger
        for name in ("lm_eval", "huggingface_hub", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        report = harness.run_eval(args.run, tasks, loops, args.output, include_paths=args.include_path or [],
                                  limit=args.limit, batch_size=args.batch_size, samples=args.samples, seed=args.seed,
                                  stderr=args.stderr, device=args.device, readout=args.readout, exit=args.exit)
    except (harness.EvalError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(report["table"])
    print(f"wrote {args.output}, plot {report['plot']}, tensorboard {report.get('tensorboard')} "
          f"(readout {report['readout']}, {report['samples']} noise draw(s), seed {report['seed']})", file=sys.stderr)
    return 0


def cmd_study(args, overrides) -> int:
    from ..config import preset
    from ..evaluation.compare import TASK_READOUTS
    from ..evaluation.study import DRAFT_READOUTS, STUDY_READOUTS, load_variants, run_study
    from ..families import family_of

    if overrides:
        raise UsageError("put config overrides in the variants file, not on the command line")
    check_budget(args)
    readouts = [r for r in args.readouts.split(",") if r]
    unknown = [r for r in readouts if r not in STUDY_READOUTS + ("elbo_continuous",) + DRAFT_READOUTS + TASK_READOUTS]
    if unknown:
        raise UsageError(f"unknown readout(s) {', '.join(unknown)}; choose from predictive, last, elbo, elbo_continuous "
                         "(drafting runs: anchor, block_elbo; reasoning-task presets: accuracy, accuracy_beyond)")
    load_variants(args.variants)  # a bad file fails here, before any data preparation or training
    config = preset(args.preset)
    data_dir = family_of(config).data_dir(args.data, config)
    run_study(args.preset, args.out, data_dir, args.variants, args.budget_minutes, args.steps, parse_loops(args.loops),
              readouts, args.samples, args.max_windows, args.split, args.judge, args.generations,
              args.generation_length)
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_bench(args) -> int:
    if args.what == "prepare":
        from ..evaluation import prepare_bench

        if not args.size_mb > 0 or (args.workers is not None and args.workers < 1):
            raise UsageError(f"bench prepare needs --size-mb > 0 and --workers >= 1 "
                             f"(got {args.size_mb}, {args.workers})")
        report = prepare_bench.run_prepare_bench(args.size_mb, args.workers, folder=args.run, seed=args.seed)
        print(json.dumps(report) if args.json else prepare_bench.format_report(report))
        return 0
    if args.what == "decode":
        from .drafting import bench_decode

        return bench_decode(args)
    if args.what == "speed":
        from ..evaluation import speed

        dims = speed.SpeedDims(d_model=args.d_model, n_layers=args.n_layers, context=args.context,
                               batch_size=args.batch_size, vocab_size=args.vocab_size)
        if dims.n_layers < 3 or dims.d_model % dims.head_dim:
            raise UsageError(f"bench speed needs --n-layers >= 3 and --d-model a multiple of {dims.head_dim}")
        report = speed.run_speed_bench(dims, compile=args.compile, rounds=args.rounds,
                                       generation=not args.no_generation, gen_context=args.gen_context,
                                       keep_memory=not args.default_allocator)
        print(json.dumps(report) if args.json else speed.format_table(report))
        return 0
    if args.run:
        raise UsageError(f"loopdb bench memory takes no run folder (got {args.run})")
    from ..device import resolve_device
    from ..evaluation.bench import format_table, run_memory_bench

    report = run_memory_bench(str(resolve_device(args.device)))
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopdb", description="Looped transformers trained with DiffusionBlocks.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenize a corpus into a data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", nargs="+", default=None, help="'shakespeare' (default) or text files / folders")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe",
                   help="bpe (sentencepiece, --vocab-size pieces) or char (one id per character: bits per character)")
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes (default: min(CPU count, 8); 1 for a corpus under 16 MB)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="the BPE tokenizer trains on at most this much of the train split, sampled evenly across "
                        "it (default 64)")
    p.add_argument("--shard-mb", type=float, default=None, help="token file size per shard (default 256)")
    p.add_argument("--chunk-mb", type=float, default=None, help="text per encoding task (default 4)")

    p = commands.add_parser("train", help="train a model; extra --key=value override the preset",
                            epilog="example: loopdb train --preset tiny --out runs/tiny --max_steps=500")
    p.add_argument("--preset", default="demo")
    p.add_argument("--data", default=None, help="prepared data folder (default: Shakespeare, prepared on first use)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--block-parallel", action="store_true",
                   help="under torchrun: each process trains its own blocks of a stacked DiffusionBlocks model")

    p = commands.add_parser("compare", help="DiffusionBlocks vs BPTT vs dense at equal time (or steps)",
                            epilog="example: loopdb compare --preset tiny --budget-minutes 2 --out runs/cmp")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--budget-minutes", type=float, default=None, help="training time per model")
    p.add_argument("--steps", type=int, default=None, help="train each model for this many steps instead")
    p.add_argument("--loops", default="1,2,4,8,16,32,64")
    p.add_argument("--samples", type=int, default=2, help="noise draws per token when scoring")
    p.add_argument("--max-windows", type=int, default=64, help="test windows scored (evenly spaced)")
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser("study", help="train recipe variants at equal time and score every readout per K",
                            epilog="example: loopdb study --preset tiny --budget-minutes 2 --variants v.json --out runs/st")
    p.add_argument("--preset", default="small")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", required=True, help='JSON: {"name": {"key": value, ..., "seeds": [0, 1]}, ...}')
    p.add_argument("--data", default=None)
    p.add_argument("--budget-minutes", type=float, default=None, help="training time per member")
    p.add_argument("--steps", type=int, default=None, help="train each member for this many steps instead")
    p.add_argument("--loops", default="1,2,4,8,16")
    p.add_argument("--readouts", default="predictive,last,elbo")
    p.add_argument("--samples", type=int, default=2, help="noise draws per token when scoring")
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--judge", default=None, help="a dense run: judges samples by generative perplexity")
    p.add_argument("--generations", type=int, default=8, help="samples per loop count for sample quality")
    p.add_argument("--generation-length", type=int, default=48)

    p = commands.add_parser("score", help="bits per byte at several loop counts (vit: test accuracy per T; "
                                          "dit: sample accuracy and Frechet distance per T)",
                            epilog="sampler settings can be changed here: --grid=karras --solver=heun "
                                   "--grid_sigma_last=0.5 --estimate=soft")
    p.add_argument("run")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--loops", "--steps", dest="loops", default=None,
                   help="loop counts / sampler steps T (default: 1,4,16; vit: 1,num_blocks; dit: 50)")
    p.add_argument("--cfg", type=float, default=None, help="dit: classifier-free guidance scale (default: the run's)")
    p.add_argument("--images-per-class", type=int, default=100, help="dit: generated images per class")
    p.add_argument("--readout", choices=["predictive", "last", "elbo", "elbo_continuous", "anchor", "block_elbo"],
                   default="predictive",
                   help="predictive: log-mean-exp over draws; last: mean log-prob of the last loop; "
                        "elbo: K-step diffusion bound; elbo_continuous: continuous-time bound; "
                        "anchor: the dense anchor head; block_elbo: a drafting run's K-step bound on L-token blocks")
    p.add_argument("--samples", type=int, default=4, help="noise draws averaged per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=None, help="score only this many windows (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="adaptive per-token exit for recurrent runs: kl:EPS, delta:EPS or gate:Q (e.g. kl:5e-4); "
                        "--loops is then the most loops")
    p.add_argument("--plot", default=None, metavar="PNG", help="task runs: accuracy against K per difficulty")
    p.add_argument("--t-samples", type=int, default=None,
                   help="masked diffusion (family mdm): stratified t draws per window in the ELBO (default 16)")

    p = commands.add_parser("sample", help="generate text with K loops per token (dit: an image grid)",
                            epilog="example: loopdb sample runs/dit --steps 50 --cfg 2.0 --out grid.png")
    p.add_argument("run")
    p.add_argument("--loops", "--steps", dest="loops", type=int, default=None,
                   help="loops per token (default 4; a stacked model's num_blocks, so each block runs once); "
                        "dit: sampler steps (default 50); mdm: unmasking steps (default 64)")
    p.add_argument("--cfg", type=float, default=None, help="dit: classifier-free guidance scale (default: the run's)")
    p.add_argument("--out", default=None, help="dit: the PNG grid to write (a row per class)")
    p.add_argument("--columns", type=int, default=10, help="dit: images per class in the grid")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 100 (family mdm: the rest of the model's window after the prompt)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="sequence-recurrent runs: stop each token's loops early (kl:EPS, delta:EPS, gate:Q)")
    p.add_argument("--last-loop-cache", action="store_true",
                   help="sequence-recurrent runs: Ouro's shortcut, one KV cache (the last loop's) instead of one per loop")
    drafts = p.add_mutually_exclusive_group()
    drafts.add_argument("--speculative", action="store_true",
                        help="drafting runs: greedy decoding with the anchor head, drafted with --loops K and verified")
    drafts.add_argument("--parallel", action="store_true",
                        help="drafting runs: L tokens per --loops K loops (no verification)")

    p = commands.add_parser("eval", help="lm-evaluation-harness tasks at several loop counts",
                            epilog="example: loopdb eval runs/demo --tasks shakespeare_bpb,shakespeare_cloze "
                                   "--loops 1,2,4,8 --output runs/demo/eval.json")
    p.add_argument("run")
    p.add_argument("--tasks", required=True, help="comma-separated task names (local ones, or lm-eval's own)")
    p.add_argument("--loops", default="1,2,4,8")
    p.add_argument("--output", required=True, help="results JSON; the plot is written next to it (.png)")
    p.add_argument("--include-path", action="append", default=None, help="extra task folder (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="noise draws averaged per token")
    p.add_argument("--readout", choices=["predictive", "last", "elbo", "elbo_continuous", "anchor"],
                   default="predictive",
                   help="how a token's log-likelihood is read from the loops (METHOD 5); anchor: the dense anchor head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stderr", action="store_true", help="compute standard errors (bootstrap for non-mean metrics)")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="show the harness's own log messages")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="sequence-recurrent runs, generate_until tasks: stop each token's loops early (kl:EPS, "
                        "delta:EPS, gate:Q); the report gives the mean loops used")

    p = commands.add_parser("bench", help="benchmarks: `bench memory` (peak memory, end to end vs block-wise); "
                                          "`bench decode RUN` (speculative / parallel decoding of a drafting run); "
                                          "`bench speed` (step and generation speed against a plain GPT); "
                                          "`bench prepare [FOLDER]` (streaming prepare of a generated corpus)",
                            epilog="example: loopdb bench decode runs/demo-draft --loops 1,2,4,8,16 --json")
    p.add_argument("what", choices=["memory", "decode", "speed", "prepare"])
    p.add_argument("run", nargs="?", default=None,
                   help="decode: a drafting run folder; prepare: a scratch folder to keep (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="bench memory and decode")
    p.add_argument("--loops", default="1,2,4,8,16", help="decode: loop counts K of the drafter")
    p.add_argument("--plot", default=None, metavar="DIR", help="decode: PNGs of acceptance, tokens/s and the "
                   "parallel samples' perplexity against K")
    p.add_argument("--prompts", type=int, default=4, help="decode: test-split prompts")
    p.add_argument("--prompt-tokens", type=int, default=16, help="decode: tokens per prompt")
    p.add_argument("--tokens", type=int, default=64, help="decode: new tokens per prompt")
    p.add_argument("--judge", default=None, help="decode: a dense run judging the parallel samples (default: the anchor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-mb", type=float, default=1000, help="bench prepare: generated corpus size")
    p.add_argument("--workers", type=int, default=None, help="bench prepare: encoding processes")
    p.add_argument("--d-model", type=int, default=256, help="bench speed: model width")
    p.add_argument("--n-layers", type=int, default=4, help="bench speed: layers (looped: 1 prelude, n-2 core, 1 coda)")
    p.add_argument("--context", type=int, default=256, help="bench speed: training window T")
    p.add_argument("--batch-size", type=int, default=16, help="bench speed: training batch")
    p.add_argument("--vocab-size", type=int, default=4096, help="bench speed: vocabulary")
    p.add_argument("--compile", action="store_true", help="bench speed: also measure with torch.compile (slow start)")
    p.add_argument("--rounds", type=int, default=5, help="bench speed: interleaved timed rounds")
    p.add_argument("--gen-context", type=int, default=512, help="bench speed: prompt length for generation")
    p.add_argument("--default-allocator", action="store_true",
                   help="bench speed: leave glibc's allocator as it is (page faults in every step), for comparison")
    p.add_argument("--no-generation", action="store_true", help="bench speed: skip the generation measurements")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, parse_overrides(extra))
        if args.command == "compare":
            return cmd_compare(args, parse_overrides(extra))
        if args.command == "study":
            return cmd_study(args, parse_overrides(extra))
        if args.command in ("score", "sample"):  # sampler settings may change at inference; the family's commands
            check_flag_minimums(args)
            return getattr(run_commands(args.run), args.command)(args, parse_overrides(extra))
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return {"prepare": cmd_prepare, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
    except LoopdbError as error:
        print(f"loopdb {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
