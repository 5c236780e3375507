"""Image data, the image task for the trainer, the sample-quality judge, and the
``loopdb score`` / ``loopdb sample`` commands of the vision families (vit, dit).

Data: scikit-learn's 8x8 digits by default (1,797 images, 16 grey levels) with a FIXED
split (a permutation seeded with 0: 1,437 train / 360 test); or ``--data`` an ``.npz``
with ``images`` (N, H, W) or (N, H, W, C) and ``labels`` (optionally ``test_images`` /
``test_labels``, else the same seeded 80/20 split), or a folder with one subfolder of
images per class. Pixels are scaled to [-1, 1].

Quality of generated images [ours]: a small MLP (scikit-learn) trained once on the real
training images and cached in the run folder; it classifies class-conditional samples
(sample accuracy) and its hidden layer is the feature space of a Frechet distance
between generated and real training images (FID's recipe with a digit-sized network).
"""

from __future__ import annotations

import json
import math
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import DataError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
VISION_EXTRA = 'pip install -e ".[vision]"'


@dataclass
class ImageData:
    train_images: torch.Tensor  # (N, C, H, W) float in [-1, 1]
    train_labels: torch.Tensor  # (N,) long
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError(f"the vision families need scikit-learn: {VISION_EXTRA}") from None
    return sklearn


def fixed_split(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a permutation seeded with SPLIT_SEED, the last 20% (rounded up) for test."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    num_test = math.ceil(count * TEST_FRACTION)
    return np.sort(order[:-num_test]), np.sort(order[-num_test:])


def _to_tensor(images: np.ndarray, max_value: float) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) -> (N, C, H, W) in [-1, 1]."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise DataError(f"images must be square, shaped (N, H, W) or (N, H, W, C); got {images.shape}")
    return torch.from_numpy(images / max_value * 2 - 1).permute(0, 3, 1, 2).contiguous()


def _split(images: torch.Tensor, labels: np.ndarray, classes: list[str]) -> ImageData:
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    train, test = (torch.from_numpy(indices) for indices in fixed_split(len(labels)))
    return ImageData(images[train], labels[train], images[test], labels[test], classes)


def load_digits() -> ImageData:
    _sklearn()
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return _split(_to_tensor(digits.images, 16.0), digits.target, [str(k) for k in range(10)])


def _load_npz(path: Path) -> ImageData:
    arrays = np.load(path)
    if "images" not in arrays or "labels" not in arrays:
        raise DataError(f"{path} needs arrays 'images' and 'labels' (has {', '.join(arrays.files)})")
    scale = 255.0 if arrays["images"].dtype == np.uint8 else 1.0  # floats are taken to be in [0, 1]
    images = _to_tensor(arrays["images"], scale)
    labels = np.asarray(arrays["labels"]).astype(np.int64)
    classes = [str(k) for k in range(int(labels.max()) + 1)]
    if "test_images" in arrays and "test_labels" in arrays:
        return ImageData(images, torch.from_numpy(labels), _to_tensor(arrays["test_images"], scale),
                         torch.from_numpy(np.asarray(arrays["test_labels"]).astype(np.int64)), classes)
    return _split(images, labels, classes)


def _load_folder(path: Path) -> ImageData:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{path}: expected one subfolder of images per class (at least two)")
    files = [(f, k) for k, name in enumerate(classes) for f in sorted((path / name).iterdir()) if f.is_file()]
    first_mode = Image.open(files[0][0]).mode
    mode = "L" if first_mode in ("L", "1") else "RGB"
    arrays = [np.asarray(Image.open(f).convert(mode)) for f, _ in files]
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"{path}: all images must have the same size")
    return _split(_to_tensor(np.stack(arrays), 255.0), np.array([k for _, k in files]), classes)


def load_image_data(source) -> ImageData:
    """The digits (source None), an .npz file or a folder of class subfolders."""
    if source is None:
        return load_digits()
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path)
    if path.is_dir():
        return _load_folder(path)
    raise DataError(f"--data {source}: expected an .npz file (images, labels) or a folder of class subfolders")


# -- the sample-quality judge ------------------------------------------------------------
class QualityJudge:
    """An MLP on pixels: accuracy on generated images, and hidden features for a Frechet distance."""

    def __init__(self, data: ImageData, hidden: int = 64):
        _sklearn()
        from sklearn.neural_network import MLPClassifier

        self.classifier = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=500, random_state=0)
        self.classifier.fit(_flat(data.train_images), data.train_labels.numpy())
        self.train_statistics = _moments(self.features(data.train_images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        weights, bias = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(_flat(images) @ weights + bias, 0.0)  # the ReLU hidden layer

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.classifier.predict(_flat(images)) == labels.numpy()).mean())

    def frechet(self, images: torch.Tensor) -> float:
        """Frechet distance between these images and the real training images, in feature space."""
        return frechet_distance(*_moments(self.features(images)), *self.train_statistics)


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.detach().cpu().float().flatten(1).numpy().astype(np.float64)


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def run_judge(run_dir, data: ImageData) -> QualityJudge:
    """The run's judge, trained on first use and cached in the run folder."""
    path = Path(run_dir) / "quality_classifier.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    judge = QualityJudge(data)
    with open(path, "wb") as f:
        pickle.dump(judge, f)
    return judge


# -- readouts shared by training-time evaluation and `loopdb score` ----------------------------
@torch.no_grad()
def classification_accuracy(model, images, labels, num_steps: int, samples: int = 1, seed: int = 0,
                            batch_size: int = 512) -> float:
    """Test accuracy of the ViT after T steps; probabilities averaged over ``samples`` noise draws."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        probs = sum(torch.softmax(model.classify(chunk, num_steps, generator).float(), -1) for _ in range(samples))
        correct += int((probs.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)


@torch.no_grad()
def generate_per_class(model, num_classes: int, per_class: int, num_steps: int, cfg_scale: float, seed: int = 0,
                       device="cpu", batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` class-conditional samples of every class, class-major order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = [model.generate(labels[start:start + batch_size].to(device), num_steps, cfg_scale, generator).cpu()
              for start in range(0, len(labels), batch_size)]
    return torch.cat(images), labels


def sample_quality(model, judge: QualityJudge, num_classes: int, per_class: int, num_steps: int, cfg_scale: float,
                   seed: int = 0, device="cpu") -> dict:
    images, labels = generate_per_class(model, num_classes, per_class, num_steps, cfg_scale, seed, device)
    return {"sample_accuracy": judge.accuracy(images, labels), "frechet_distance": judge.frechet(images)}


class ImageTask:
    """Batches of labelled images for the trainer; evaluation by test accuracy (vit) or sample quality (dit)."""

    def __init__(self, config: Config, data_dir):
        self.config = config
        self.data = load_image_data(data_dir)
        m = config.model
        m.channels, m.image_size = self.data.train_images.shape[1], self.data.train_images.shape[2]
        m.num_classes = len(self.data.classes)
        self._judge = None

    def batch(self, generator: torch.Generator, device) -> dict:
        index = torch.randint(len(self.data.train_labels), (self.config.train.batch_size,), generator=generator)
        return {"images": self.data.train_images[index].to(device), "labels": self.data.train_labels[index].to(device)}

    def evaluate(self, model, device, autocast) -> dict:
        train, data = self.config.train, self.data
        loops = train.eval_loops if model.objective.has_loops else (1,)
        results = {}
        with autocast():
            for num_steps in loops:
                if self.config.model.family == "vit":
                    results[f"test/accuracy@{num_steps}"] = classification_accuracy(
                        model, data.test_images.to(device), data.test_labels, num_steps, train.eval_samples, train.seed)
                else:
                    self._judge = self._judge or QualityJudge(data)
                    quality = sample_quality(model, self._judge, len(data.classes), 20, num_steps,
                                             self.config.diffusion.cfg_scale, train.seed, device)
                    results.update({f"samples/{key}@{num_steps}": value for key, value in quality.items()})
        return results

    def sample(self, model, step: int):
        return None


# -- `loopdb score` and `loopdb sample` for the vision families ----------------------------------
def _open(args, sampler):
    from .training.checkpoint import load_model, run_data_dir
    from .training.trainer import resolve_device

    device = resolve_device(args.device)
    model, config = load_model(args.run, device, sampler)
    return model, config, load_image_data(run_data_dir(args.run)), device


def score(args, sampler) -> int:
    """Test accuracy per T (vit); sample accuracy and Frechet distance per T (dit)."""
    from .cli import UsageError, parse_loops

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
    from .cli import UsageError

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


def save_grid(images: torch.Tensor, classes: list[str], columns: int, path, title: str = "") -> None:
    """Class-major images -> one PNG, a row per class labelled with its name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError('writing an image grid needs matplotlib: pip install -e ".[vision]"') from None
    channels, size = images.shape[1], images.shape[2]
    pad = 1
    rows = len(classes)
    canvas = np.zeros((rows * (size + pad) + pad, columns * (size + pad) + pad, channels), dtype=np.float32)
    pixels = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = pad + row * (size + pad), pad + column * (size + pad)
        canvas[top:top + size, left:left + size] = image
    figure, axis = plt.subplots(figsize=(0.35 * columns + 1, 0.35 * rows + 0.6))
    axis.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray_r" if channels == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([pad + row * (size + pad) + size / 2 for row in range(rows)], classes)
    axis.set_xticks([])
    axis.set_title(title, fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
