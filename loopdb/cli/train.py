"""``loopdb train``: train a model from a preset, extra ``--key=value`` overriding it."""

from __future__ import annotations

import json
import sys


def add_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model; extra --key=value override the preset",
                            epilog="example: loopdb train --preset tiny --out runs/tiny --max_steps=500")
    p.add_argument("--preset", default="demo")
    p.add_argument("--data", default=None, help="prepared data folder (default: Shakespeare, prepared on first use)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--block-parallel", action="store_true",
                   help="under torchrun: each process trains its own blocks of a stacked DiffusionBlocks model")
    p.set_defaults(handler=run, takes_overrides=True)


def run(args, overrides) -> int:
    from ..config import preset
    from ..families import check_config, family_of
    from ..runs.checkpoint import latest_checkpoint
    from ..training.trainer import StopSignals, Trainer

    config = check_config(preset(args.preset).apply_overrides(overrides))  # before any data preparation
    trainer = None
    try:
        with StopSignals(abandon=True):  # Ctrl-C / SIGTERM: data preparation stops at once; training: Trainer.train
            data_dir = family_of(config).data_dir(args.data, config)
            trainer = Trainer(config, data_dir, args.out, resume=args.resume, progress=not args.quiet,
                              block_parallel=args.block_parallel, preset=args.preset)
            main_rank = trainer.group.is_main
            if main_rank:
                print(f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters on {trainer.device}; "
                      f"run folder {args.out}", file=sys.stderr)
            results = trainer.train()
    except KeyboardInterrupt:
        again = " ".join(["loopdb train --preset", args.preset, *(["--data", args.data] if args.data else []),
                          "--out", args.out, *(f"--{key}={value}" for key, value in overrides.items())])
        if latest_checkpoint(args.out) is None:
            print(f"stopped before the first checkpoint; start again with: {again}", file=sys.stderr)
        else:
            print(f"stopped; newest checkpoint {latest_checkpoint(args.out).name}; continue with: {again} --resume",
                  file=sys.stderr)
        return 130
    if main_rank:
        print(json.dumps({"step": trainer.step, **results}))
    return 0
