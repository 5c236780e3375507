"""``loopdb compare``: DiffusionBlocks vs BPTT vs dense at equal time or steps (loopdb.evaluation.compare)."""

from __future__ import annotations

from pathlib import Path

from .args import add_budget_arguments, check_budget, parse_loops


def add_parser(commands) -> None:
    p = commands.add_parser("compare", help="DiffusionBlocks vs BPTT vs dense at equal time (or steps)",
                            epilog="example: loopdb compare --preset tiny --budget-minutes 2 --out runs/cmp")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None)
    add_budget_arguments(p, "model")
    p.add_argument("--loops", default="1,2,4,8,16,32,64")
    p.add_argument("--samples", type=int, default=2, help="noise draws per token when scoring")
    p.add_argument("--max-windows", type=int, default=64, help="test windows scored (evenly spaced)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run, takes_overrides=True)


def run(args, overrides) -> int:
    from ..config import preset
    from ..data.preparation import resolve_data_dir
    from ..evaluation.compare import run_compare

    check_budget(args)
    loops = parse_loops(args.loops)
    config = preset(args.preset).apply_overrides(overrides)  # fail fast on bad keys, before any training
    data_dir = resolve_data_dir(args.data, config.train.data_vocab_size)
    results = run_compare(args.preset, args.out, data_dir, args.budget_minutes, args.steps, loops, args.samples,
                          args.max_windows, args.seed, [f"--{k}={v}" for k, v in overrides.items()])
    print((Path(args.out) / "results.md").read_text())
    print(f"DiffusionBlocks step / BPTT step = {results['step_ratio_diffusion_vs_bptt']:.3f}")
    return 0
