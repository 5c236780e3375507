"""Image data of the vision families (vit, dit); their readouts are loopdb.readouts.vision.

Data: scikit-learn's 8x8 digits by default (1,797 images, 16 grey levels) with a FIXED
split (a permutation seeded with 0: 1,437 train / 360 test); or ``--data`` an ``.npz``
with ``images`` (N, H, W) or (N, H, W, C) and ``labels`` (optionally ``test_images`` /
``test_labels``, else the same seeded 80/20 split), or a folder with one subfolder of
images per class. Pixels are scaled to [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

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


def require_sklearn():
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
    require_sklearn()
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
