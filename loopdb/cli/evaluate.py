"""``loopdb eval``: lm-evaluation-harness tasks at several loop counts (loopdb.evaluation.lm_eval_sweep);
offline by default."""

from __future__ import annotations

import os
import sys

from ..errors import UsageError
from ..names import READOUTS
from .args import parse_loops


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="lm-evaluation-harness tasks at several loop counts",
                            epilog="example: loopdb eval runs/demo --tasks shakespeare_bpb,shakespeare_cloze "
                                   "--loops 1,2,4,8 --output runs/demo/eval.json")
    p.add_argument("run")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (local ones, or lm-eval's own)")
    p.add_argument("--loops", default="1,2,4,8")
    p.add_argument("--output", required=True, help="results JSON; the plot is written next to it (.png)")
    p.add_argument("--include-path", action="append", default=None, help="extra lm-eval task folder (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="noise draws averaged per token")
    p.add_argument("--readout", choices=READOUTS, default="predictive",
                   help="how a token's log-likelihood is read from the loops (docs/method.md#scoring); anchor: the dense anchor head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stderr", action="store_true", help="compute standard errors (bootstrap for non-mean metrics)")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="show the harness's own log messages")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="sequence-recurrent runs, generate_until tasks: stop each token's loops early (kl:EPS, "
                        "delta:EPS, gate:Q); the report gives the mean loops used")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
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
        from ..evaluation import lm_eval_sweep
    except ImportError as error:
        raise UsageError(str(error)) from None
    if not args.verbose:  # the harness's and the hub client's chatter; errors still show
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub configures its logger
        for name in ("lm_eval", "huggingface_hub", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        report = lm_eval_sweep.run_eval(args.run, tasks, loops, args.output, include_paths=args.include_path or [],
                                        limit=args.limit, batch_size=args.batch_size, samples=args.samples,
                                        seed=args.seed, stderr=args.stderr, device=args.device, readout=args.readout,
                                        exit=args.exit)
    except (lm_eval_sweep.EvalError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(report["table"])
    print(f"wrote {args.output}, plot {report['plot']}, tensorboard {report.get('tensorboard')} "
          f"(readout {report['readout']}, {report['samples']} noise draw(s), seed {report['seed']})", file=sys.stderr)
    return 0
