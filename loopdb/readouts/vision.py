"""Readouts of the vision families: test accuracy of the ViT after T steps, class-conditional
DiT samples, and their quality.

Quality of generated images [ours]: a small MLP (scikit-learn) trained once on the real
training images and cached in the run folder; it classifies class-conditional samples
(sample accuracy) and its hidden layer is the feature space of a Frechet distance
between generated and real training images (FID's recipe with a digit-sized network).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..images import ImageData, require_sklearn
from ..sampling.vision import classify, generate_images

# -- the sample-quality judge ------------------------------------------------------------
class QualityJudge:
    """An MLP on pixels: accuracy on generated images, and hidden features for a Frechet distance."""

    def __init__(self, data: ImageData, hidden: int = 64):
        require_sklearn()
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
        probs = sum(torch.softmax(classify(model, chunk, num_steps, generator).float(), -1) for _ in range(samples))
        correct += int((probs.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)


@torch.no_grad()
def generate_per_class(model, num_classes: int, per_class: int, num_steps: int, cfg_scale: float, seed: int = 0,
                       device="cpu", batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` class-conditional samples of every class, class-major order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = [generate_images(model, labels[start:start + batch_size].to(device), num_steps, cfg_scale, generator).cpu()
              for start in range(0, len(labels), batch_size)]
    return torch.cat(images), labels


def sample_quality(model, judge: QualityJudge, num_classes: int, per_class: int, num_steps: int, cfg_scale: float,
                   seed: int = 0, device="cpu") -> dict:
    images, labels = generate_per_class(model, num_classes, per_class, num_steps, cfg_scale, seed, device)
    return {"sample_accuracy": judge.accuracy(images, labels), "frechet_distance": judge.frechet(images)}
