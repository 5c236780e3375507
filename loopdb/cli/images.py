"""`loopdb score` and `loopdb sample` for the vision families (vit, dit)."""

from __future__ import annotations

import json
import sys

from ..device import resolve_device
from ..errors import UsageError
from ..evaluation.plots import save_grid
from ..images import load_image_data
from ..readouts.vision import classification_accuracy, generate_per_class, run_judge, sample_quality
from ..runs.folder import load_model, run_data_dir
from .args import parse_loops


def _open(args, sampler):
    device = resolve_device(args.device)
    model, config = load_model(args.run, device, sampler)
    return model, config, load_image_data(run_data_dir(args.run)), device


def score(args, sampler) -> int:
    """Test accuracy per T (vit); sample accuracy and Frechet distance per T (dit)."""
    model, config, data, device = _open(args, sampler)
    if config.model.family == "vit":
        loops = parse_loops(args.loops or f"1,{config.model.num_blocks}")
        accuracy = {str(t): classification_accuracy(model, data.test_images.to(device), data.test_labels, t,
                                                    args.samples, args.seed) for t in loops}
        report = {"accuracy": accuracy, "objective": config.train.objective, "samples": args.samples,
                  "split": "test", "images": len(data.test_labels)}
    else:
        loops = parse_loops(args.loops or "50")
        if args.images_per_class < 2:
            raise UsageError("--images-per-class must be >= 2 (a Frechet distance needs a covariance)")
        cfg = config.diffusion.cfg_scale if args.cfg is None else args.cfg
        judge = run_judge(args.run, data)
        per_step = {t: sample_quality(model, judge, len(data.classes), args.images_per_class, t, cfg, args.seed,
                                      device) for t in loops}
        report = {key: {str(t): values[key] for t, values in per_step.items()}
                  for key in ("sample_accuracy", "frechet_distance")}
        report.update({"objective": config.train.objective, "cfg": cfg, "images_per_class": args.images_per_class,
                       "real_test": {"accuracy": judge.accuracy(data.test_images, data.test_labels),
                                     "frechet_distance": judge.frechet(data.test_images)}})
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def sample(args, sampler) -> int:
    """dit: a labelled grid, one row per class (``--out``)."""
    model, config, data, device = _open(args, sampler)
    if config.model.family != "dit":
        raise UsageError(f"{args.run} is a {config.model.family} classifier; only dit runs generate images")
    if not args.out:
        raise UsageError("give --out grid.png")
    steps = 50 if args.loops is None else args.loops
    if steps < 1:
        raise UsageError(f"--steps {steps}: need at least one step")
    cfg = config.diffusion.cfg_scale if args.cfg is None else args.cfg
    images, _ = generate_per_class(model, len(data.classes), args.columns, steps, cfg, args.seed, device)
    save_grid(images, data.classes, args.columns, args.out, f"{config.train.objective}, T={steps}, cfg={cfg}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
