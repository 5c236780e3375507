"""Objectives of the vision families (docs/method.md#vision): the ViT classifier and the DiT generator,
each trained with DiffusionBlocks (one block per step, sigma from its range) or end to end."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..maths.edm import loss_weight


def block_and_sigmas(model, batch: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """One block, uniformly, for the whole batch, and one sigma per example from its training range."""
    block_index = int(torch.randint(model.partition.num_blocks, (1,), generator=generator))
    lo, hi = model.partition.training_range(block_index)
    return block_index, model.schedule.sample_sigmas(batch, generator, lo, hi)


class ViTObjective:
    """diffusion (DiffusionBlocks) or, with ``dense``, plain CE through every layer."""

    def __init__(self, dense: bool = False):
        self.dense = dense

    def loss(self, model, batch: dict, generator: torch.Generator, step: int = 0):
        images, labels = batch["images"], batch["labels"]
        if self.dense:
            cross_entropy = F.cross_entropy(model.dense_logits(images).float(), labels)
            return cross_entropy, {"ce": cross_entropy.detach()}
        block_index, sigma = block_and_sigmas(model, len(labels), generator)
        sigma = sigma.to(images.device)
        targets = model.targets(labels)
        noise = torch.randn(targets.shape, generator=generator).to(targets.device, targets.dtype)
        logits = model(images, targets + sigma[:, None] * noise, sigma, block_index)
        cross_entropy = F.cross_entropy(logits.float(), labels, reduction="none")
        diffusion = model.diffusion
        weight = loss_weight(sigma, model.sigma_data, diffusion.loss_weight, diffusion.loss_weight_clamp or None)
        return (weight * cross_entropy).mean(), {"ce": cross_entropy.mean().detach(),
                                                 "block": torch.tensor(float(block_index))}


class DiTObjective:
    """diffusion (DiffusionBlocks) or, with ``dense``, one network for every sigma."""

    def __init__(self, dense: bool = False):
        self.dense = dense

    def loss(self, model, batch: dict, generator: torch.Generator, step: int = 0):
        images, labels = batch["images"], batch["labels"]
        if self.dense:
            block_index, sigma = None, model.schedule.sample_sigmas(len(labels), generator)
        else:
            block_index, sigma = block_and_sigmas(model, len(labels), generator)
        sigma = sigma.to(images.device)
        dropped = torch.rand(len(labels), generator=generator).to(labels.device) < model.diffusion.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, model.null_class), labels)
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        denoised = model(images + sigma[:, None, None, None] * noise, sigma, labels, block_index)
        squared_error = ((denoised.float() - images) ** 2).flatten(1).mean(1)
        diffusion = model.diffusion
        weight = loss_weight(sigma, model.sigma_data, diffusion.loss_weight, diffusion.loss_weight_clamp or None)
        stats = {"mse": squared_error.mean().detach()}
        if block_index is not None:
            stats["block"] = torch.tensor(float(block_index))
        return (weight * squared_error).mean(), stats
