"""The vision families (docs/method.md#vision): the ViT classifier and the DiT generator on images
(scikit-learn's 8x8 digits by default; loopdb.images)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import Config
from ..images import load_image_data
from ..models.dit import DiTDenoiser
from ..models.vit import ViTClassifier
from ..objectives.vision import DiTObjective, ViTObjective
from ..readouts.vision import QualityJudge, classification_accuracy, sample_quality
from .spec import Family, dense_trains_every_parameter


class ImageFeed:
    """Batches of labelled images for the trainer; evaluation by test accuracy (vit) or sample quality (dit)."""

    def __init__(self, config: Config, data_dir, classifies: bool):
        self.config, self.classifies = config, classifies
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
        loops = train.eval_loops if model.blockwise or not self.classifies else (1,)  # the dense ViT ignores T
        results = {}
        with autocast():
            for num_steps in loops:
                if self.classifies:
                    results[f"test/accuracy@{num_steps}"] = classification_accuracy(
                        model, data.test_images.to(device), data.test_labels, num_steps, train.eval_samples, train.seed)
                else:
                    self._judge = self._judge or QualityJudge(data)
                    quality = sample_quality(model, self._judge, len(data.classes), 20, num_steps,
                                             self.config.diffusion.cfg_scale, train.seed, device)
                    results.update({f"samples/{key}@{num_steps}": value for key, value in quality.items()})
        return results

    def sample_text(self, model, step: int):
        return None


def image_data_dir(data: str | None, config: Config) -> Path | None:
    return Path(data) if data else None


def _vision_rules(config: Config) -> list:
    m, d, t = config.model, config.diffusion, config.train
    return [
        (t.objective in ("diffusion", "dense"), f"family {m.family} trains with objective diffusion or dense, "
                                                f"got {t.objective!r}"),
        (m.patch_size >= 1 and m.image_size % m.patch_size == 0,
         f"image_size={m.image_size} must be divisible by patch_size={m.patch_size}"),
        (m.channels >= 1 and m.num_classes >= 2, "channels must be >= 1 and num_classes >= 2"),
        (0 <= d.label_dropout < 1, "label_dropout must be in [0, 1)"),
        (d.cfg_scale >= 0, "cfg_scale must be >= 0"),
    ]


def _build_vit(config: Config) -> ViTClassifier:
    return ViTClassifier(config, blockwise=config.train.objective == "diffusion")


def _build_dit(config: Config) -> DiTDenoiser:
    return DiTDenoiser(config, blockwise=config.train.objective == "diffusion")


def _vit_objective(config: Config) -> ViTObjective:
    return ViTObjective(dense=config.train.objective == "dense")


def _dit_objective(config: Config) -> DiTObjective:
    return DiTObjective(dense=config.train.objective == "dense")


VIT = Family(build=_build_vit, objective=_vit_objective, feed=functools.partial(ImageFeed, classifies=True),
             data_dir=image_data_dir, rules=_vision_rules, commands="images")
DIT = Family(build=_build_dit, objective=_dit_objective, feed=functools.partial(ImageFeed, classifies=False),
             data_dir=image_data_dir, rules=_vision_rules, commands="images",
             trains_every_parameter=dense_trains_every_parameter)
