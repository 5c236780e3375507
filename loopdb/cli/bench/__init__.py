"""``loopdb bench``: one subcommand per benchmark, each in its own module with its own arguments:
memory (peak training memory), decode (a drafting run's decoding), speed (against a plain GPT) and
prepare (streaming preparation of a generated corpus)."""

from __future__ import annotations

from . import decode, memory, prepare, speed

BENCHMARKS = (memory, decode, speed, prepare)


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="benchmarks: `bench memory` (peak memory, end to end vs block-wise); "
                                          "`bench decode RUN` (speculative / parallel decoding of a drafting run); "
                                          "`bench speed` (step and generation speed against a plain GPT); "
                                          "`bench prepare [FOLDER]` (streaming prepare of a generated corpus)",
                            epilog="example: loopdb bench decode runs/demo-draft --loops 1,2,4,8,16 --json")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    for benchmark in BENCHMARKS:
        benchmark.add_parser(benchmarks)
