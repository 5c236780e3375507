"""``loopdb study``: train the variants of a variants file at equal time, FLOPs or steps (or at equal time
AND equal FLOPs) and score every readout per K (loopdb.evaluation.study)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..names import BLOCK_READOUTS, READOUTS, STUDY_DEFAULT_READOUTS, STUDY_READOUTS, TASK_READOUTS
from .args import add_budget_arguments, check_budget, parse_loops


def add_parser(commands) -> None:
    p = commands.add_parser("study", help="train recipe variants at equal time and score every readout per K",
                            epilog="example: loopdb study --preset tiny --budget-minutes 2 --variants v.json --out runs/st")
    p.add_argument("--preset", default="small")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", required=True, help='JSON: {"name": {"key": value, ..., "seeds": [0, 1]}, ...}')
    p.add_argument("--data", default=None)
    add_budget_arguments(p, "member")
    p.add_argument("--budget-flops", type=float, default=None,
                   help="training FLOPs per member (steps from its FLOPs per step); with --budget-minutes as well, "
                        "the study runs twice, at equal time and at equal FLOPs")
    p.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                   help="what --budget-minutes counts: elapsed time, or the member's CPU time (fair on shared cores)")
    p.add_argument("--loops", default="1,2,4,8,16")
    p.add_argument("--readouts", default=",".join(STUDY_DEFAULT_READOUTS),
                   help="comma-separated, from: " + ", ".join(STUDY_READOUTS))
    p.add_argument("--samples", type=int, default=2, help="noise draws per token when scoring")
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--judge", default=None, help="a dense run: judges samples by generative perplexity and MAUVE")
    p.add_argument("--judge-preset", default=None,
                   help="train --judge from this preset first (once: a finished judge is reused), e.g. tiny-judge")
    p.add_argument("--generations", type=int, default=8, help="samples per loop count for sample quality")
    p.add_argument("--generation-length", type=int, default=48)
    p.set_defaults(handler=run, takes_overrides=True)


def run(args, overrides) -> int:
    from ..config import preset
    from ..evaluation.study import load_variants, run_equal_compute, run_study
    from ..families import family_of

    if overrides:
        raise UsageError("put config overrides in the variants file, not on the command line")
    _check_budgets(args)
    if args.judge_preset and not args.judge:
        raise UsageError("--judge-preset needs --judge, the run folder the judge is trained into (or reused from)")
    if args.judge_preset:
        preset(args.judge_preset)  # an unknown preset fails here, before any training
    readouts = [r for r in args.readouts.split(",") if r]
    unknown = [r for r in readouts if r not in STUDY_READOUTS]
    if unknown:
        raise UsageError(f"unknown readout(s) {', '.join(unknown)}; choose from {', '.join(READOUTS)}, "
                         f"{', '.join(BLOCK_READOUTS)} (drafting runs) or {', '.join(TASK_READOUTS)} "
                         "(reasoning-task presets)")
    load_variants(args.variants, args.preset)  # a bad file fails here, before any data preparation or training
    config = preset(args.preset)
    data_dir = family_of(config).data_dir(args.data, config)
    settings = dict(loops=parse_loops(args.loops), readouts=readouts, samples=args.samples,
                    max_windows=args.max_windows, split=args.split, judge=args.judge, generations=args.generations,
                    generation_length=args.generation_length, budget_clock=args.budget_clock,
                    judge_preset=args.judge_preset)
    if args.budget_minutes is not None and args.budget_flops is not None:
        run_equal_compute(args.preset, args.out, data_dir, args.variants, args.budget_minutes, args.budget_flops,
                          **settings)
    else:
        run_study(args.preset, args.out, data_dir, args.variants, args.budget_minutes, args.steps,
                  budget_flops=args.budget_flops, **settings)
    print((Path(args.out) / "results.md").read_text())
    return 0


def _check_budgets(args) -> None:
    """One of --budget-minutes, --budget-flops or --steps, or --budget-minutes with --budget-flops."""
    if args.budget_flops is None:
        check_budget(args)
    elif args.steps is not None:
        raise UsageError("--steps and --budget-flops are two budgets; give one (or --budget-minutes with "
                         "--budget-flops for both tables)")
    elif args.budget_flops <= 0 or (args.budget_minutes is not None and args.budget_minutes <= 0):
        raise UsageError("--budget-flops and --budget-minutes must be > 0")
