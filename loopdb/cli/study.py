"""``loopdb study``: train the variants of a variants file at equal time or steps and score every readout
per K (loopdb.evaluation.study)."""

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
    p.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                   help="what --budget-minutes counts: elapsed time, or the member's CPU time (fair on shared cores)")
    p.add_argument("--loops", default="1,2,4,8,16")
    p.add_argument("--readouts", default=",".join(STUDY_DEFAULT_READOUTS),
                   help="comma-separated, from: " + ", ".join(STUDY_READOUTS))
    p.add_argument("--samples", type=int, default=2, help="noise draws per token when scoring")
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--judge", default=None, help="a dense run: judges samples by generative perplexity")
    p.add_argument("--generations", type=int, default=8, help="samples per loop count for sample quality")
    p.add_argument("--generation-length", type=int, default=48)
    p.set_defaults(handler=run, takes_overrides=True)


def run(args, overrides) -> int:
    from ..config import preset
    from ..evaluation.study import load_variants, run_study
    from ..families import family_of

    if overrides:
        raise UsageError("put config overrides in the variants file, not on the command line")
    check_budget(args)
    readouts = [r for r in args.readouts.split(",") if r]
    unknown = [r for r in readouts if r not in STUDY_READOUTS]
    if unknown:
        raise UsageError(f"unknown readout(s) {', '.join(unknown)}; choose from {', '.join(READOUTS)}, "
                         f"{', '.join(BLOCK_READOUTS)} (drafting runs) or {', '.join(TASK_READOUTS)} "
                         "(reasoning-task presets)")
    load_variants(args.variants)  # a bad file fails here, before any data preparation or training
    config = preset(args.preset)
    data_dir = family_of(config).data_dir(args.data, config)
    run_study(args.preset, args.out, data_dir, args.variants, args.budget_minutes, args.steps, parse_loops(args.loops),
              readouts, args.samples, args.max_windows, args.split, args.judge, args.generations,
              args.generation_length, args.budget_clock)
    print((Path(args.out) / "results.md").read_text())
    return 0
