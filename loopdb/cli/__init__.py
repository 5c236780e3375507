"""The ``loopdb`` command line: one module per command, each with its own arguments (prepare, train,
score, sample, eval, compare, study, and bench with one module per benchmark).

Any user error (unknown preset or key, missing run folder, K < 1, bad data)
prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LoopdbError, UsageError
from . import bench, compare, evaluate, export, prepare, sample, score, study, train
from .args import parse_overrides

USER_ERROR = 2
COMMANDS = (prepare, train, compare, study, score, sample, evaluate, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopdb", description="Looped transformers trained with DiffusionBlocks.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.takes_overrides:  # train, compare, study: config keys; score, sample: sampler settings
            return args.handler(args, parse_overrides(extra))
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return args.handler(args)
    except LoopdbError as error:
        print(f"loopdb {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
