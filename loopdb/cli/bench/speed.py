"""``loopdb bench speed``: training and generation speed of the looped LM against a plain GPT
(loopdb.evaluation.speed)."""

from __future__ import annotations

import json

from ...errors import UsageError


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("speed", help="step and generation speed against a plain GPT")
    p.add_argument("--json", action="store_true")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--n-layers", type=int, default=4, help="layers (looped: 1 prelude, n-2 core, 1 coda)")
    p.add_argument("--context", type=int, default=256, help="training window T")
    p.add_argument("--batch-size", type=int, default=16, help="training batch")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile (slow start)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--gen-context", type=int, default=512, help="prompt length for generation")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator as it is (page faults in every step), for comparison")
    p.add_argument("--no-generation", action="store_true", help="skip the generation measurements")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ...evaluation import speed

    dims = speed.SpeedDims(d_model=args.d_model, n_layers=args.n_layers, context=args.context,
                           batch_size=args.batch_size, vocab_size=args.vocab_size)
    if dims.n_layers < 3 or dims.d_model % dims.head_dim:
        raise UsageError(f"bench speed needs --n-layers >= 3 and --d-model a multiple of {dims.head_dim}")
    report = speed.run_speed_bench(dims, compile=args.compile, rounds=args.rounds,
                                   generation=not args.no_generation, gen_context=args.gen_context,
                                   keep_memory=not args.default_allocator)
    print(json.dumps(report) if args.json else speed.format_table(report))
    return 0
