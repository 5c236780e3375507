"""``loopdb bench decode RUN``: how a drafting run (draft width L > 1, anchor head) decodes per K, speculative
and parallel (loopdb.evaluation.decoding)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ...errors import UsageError
from ..args import parse_loops


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("decode", help="speculative / parallel decoding of a drafting run",
                              epilog="example: loopdb bench decode runs/demo-draft --loops 1,2,4,8,16 --json")
    p.add_argument("run", nargs="?", default=None, help="a drafting run folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loops", default="1,2,4,8,16", help="loop counts K of the drafter")
    p.add_argument("--plot", default=None, metavar="DIR", help="PNGs of acceptance, tokens/s and the "
                   "parallel samples' perplexity against K")
    p.add_argument("--prompts", type=int, default=4, help="test-split prompts")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--judge", default=None, help="a dense run judging the parallel samples (default: the anchor)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ...device import resolve_device
    from ...evaluation.decoding import format_decode_table, run_decode_bench

    if not args.run:
        raise UsageError("loopdb bench decode RUN: name the run folder of a drafting run (e.g. --preset demo-draft)")
    for flag, value in (("--prompts", args.prompts), ("--tokens", args.tokens)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    try:
        report = run_decode_bench(args.run, parse_loops(args.loops), args.prompts, args.prompt_tokens, args.tokens,
                                  args.judge, args.seed, resolve_device(args.device))
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(json.dumps(report) if args.json else format_decode_table(report))
    if args.plot:
        from ...evaluation.decoding import plot_decode_reports
        from ...evaluation.plots import PlotUnavailable

        try:
            for path in plot_decode_reports({Path(args.run).name: report}, args.plot):
                print(f"[loopdb] wrote {path}", file=sys.stderr)
        except PlotUnavailable as error:
            raise UsageError(str(error)) from None
    return 0
