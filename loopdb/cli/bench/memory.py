"""``loopdb bench memory``: peak training memory of the stacked LM, end to end vs DiffusionBlocks
(loopdb.evaluation.bench)."""

from __future__ import annotations

import json


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("memory", help="peak memory of a few training steps, end to end vs block-wise")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ...device import resolve_device
    from ...evaluation.bench import format_table, run_memory_bench

    report = run_memory_bench(str(resolve_device(args.device)))
    print(json.dumps(report) if args.json else format_table(report))
    return 0
