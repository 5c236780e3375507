"""``loopdb score``: a run's scores at several loop counts; the run's family picks the body (text, masked,
images; drafting runs' block ELBO in drafting). Extra ``--key=value`` change sampler settings."""

from __future__ import annotations

from ..names import BLOCK_READOUTS, READOUTS
from .args import check_flag_minimums


def add_parser(commands) -> None:
    p = commands.add_parser("score", help="bits per byte at several loop counts (vit: test accuracy per T; "
                                          "dit: sample accuracy and Frechet distance per T)",
                            epilog="sampler settings can be changed here: --grid=karras --solver=heun "
                                   "--grid_sigma_last=0.5 --estimate=soft")
    p.add_argument("run")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--loops", "--steps", dest="loops", default=None,
                   help="loop counts / sampler steps T (default: 1,4,16; vit: 1,num_blocks; dit: 50)")
    p.add_argument("--cfg", type=float, default=None, help="dit: classifier-free guidance scale (default: the run's)")
    p.add_argument("--images-per-class", type=int, default=100, help="dit: generated images per class")
    p.add_argument("--readout", choices=READOUTS + BLOCK_READOUTS, default="predictive",
                   help="predictive: log-mean-exp over draws; last: mean log-prob of the last loop; "
                        "elbo: K-step diffusion bound; elbo_continuous: continuous-time bound; "
                        "anchor: the dense anchor head; block_elbo: a drafting run's K-step bound on L-token blocks")
    p.add_argument("--samples", type=int, default=4, help="noise draws averaged per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=None, help="score only this many windows (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--exit", default=None, metavar="RULE",
                   help="adaptive per-token exit for recurrent runs: kl:EPS, delta:EPS or gate:Q (e.g. kl:5e-4); "
                        "--loops is then the most loops")
    p.add_argument("--plot", default=None, metavar="PNG", help="task runs: accuracy against K per difficulty")
    p.add_argument("--t-samples", type=int, default=None,
                   help="masked diffusion (family mdm): stratified t draws per window in the ELBO (default 16)")
    p.set_defaults(handler=run, takes_overrides=True)


def family_commands(run):
    """The module of score/sample bodies for this run's family (its ``commands``)."""
    from ..families import family_of
    from ..runs.folder import open_run
    import importlib

    # the family's body module by name (loopdb.cli.text | masked | images), imported only when used
    return importlib.import_module(f"{__package__}.{family_of(open_run(run)[0]).commands}")


def run(args, sampler) -> int:
    """``sampler``: the --key=value overrides, settings that may change at inference."""
    check_flag_minimums(args)
    return family_commands(args.run).score(args, sampler)
