"""``loopdb sample``: text with K loops per token (dit: an image grid); the run's family picks the body
(text, masked, images; drafting runs' speculative and parallel decoding in drafting)."""

from __future__ import annotations

from .args import check_flag_minimums
from .score import family_commands


def add_parser(commands) -> None:
    p = commands.add_parser("sample", help="generate text with K loops per token (dit: an image grid)",
                            epilog="example: loopdb sample runs/dit --steps 50 --cfg 2.0 --out grid.png")
    p.add_argument("run")
    p.add_argument("--loops", "--steps", dest="loops", type=int, default=None,
                   help="loops per token (default 4; a stacked model's num_blocks, so each block runs once); "
                        "dit: sampler steps (default 50); mdm: unmasking steps (default 64)")
    p.add_argument("--cfg", type=float, default=None, help="dit: classifier-free guidance scale (default: the run's)")
    p.add_argument("--out", default=None, help="dit: the PNG grid to write (a row per class)")
    p.add_argument("--columns", type=int, default=10, help="dit: images per class in the grid")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 100 (family mdm: the rest of the model's window after the prompt)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="sequence-recurrent runs: stop each token's loops early (kl:EPS, delta:EPS, gate:Q)")
    p.add_argument("--last-loop-cache", action="store_true",
                   help="sequence-recurrent runs: Ouro's shortcut, one KV cache (the last loop's) instead of one per loop")
    drafts = p.add_mutually_exclusive_group()
    drafts.add_argument("--speculative", action="store_true",
                        help="drafting runs: greedy decoding with the anchor head, drafted with --loops K and verified")
    drafts.add_argument("--parallel", action="store_true",
                        help="drafting runs: L tokens per --loops K loops (no verification)")
    p.set_defaults(handler=run, takes_overrides=True)


def run(args, sampler) -> int:
    """``sampler``: the --key=value overrides, settings that may change at inference."""
    check_flag_minimums(args)
    return family_commands(args.run).sample(args, sampler)
