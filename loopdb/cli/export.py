"""`loopdb export RUN --out DIR`: the run as a transformers folder (loopdb.export)."""

from __future__ import annotations

import sys


def add_parser(commands) -> None:
    p = commands.add_parser("export", help="write a looped LM run as a transformers model folder",
                            epilog="load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="the default noise seed of the exported model")
    p.add_argument("--samples", type=int, default=4, help="the default noise draws of its predictive readout")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ..errors import UsageError
    from ..export import export_run

    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: need at least one noise draw")
    out = export_run(args.run, args.out, seed=args.seed, samples=args.samples)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)", file=sys.stderr)
    return 0
