"""``loopdb bench prepare``: MB/s and peak memory of preparing a generated corpus
(loopdb.evaluation.prepare_bench)."""

from __future__ import annotations

import json

from ...errors import UsageError


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("prepare", help="streaming prepare of a generated corpus")
    p.add_argument("run", nargs="?", default=None, metavar="FOLDER",
                   help="a scratch folder to keep (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-mb", type=float, default=1000, help="generated corpus size")
    p.add_argument("--workers", type=int, default=None, help="encoding processes")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ...evaluation import prepare_bench

    if not args.size_mb > 0 or (args.workers is not None and args.workers < 1):
        raise UsageError(f"bench prepare needs --size-mb > 0 and --workers >= 1 (got {args.size_mb}, {args.workers})")
    report = prepare_bench.run_prepare_bench(args.size_mb, args.workers, folder=args.run, seed=args.seed)
    print(json.dumps(report) if args.json else prepare_bench.format_report(report))
    return 0
