"""Samplers of the vision families (docs/method.md#vision): the ViT's label after T steps and the DiT's
class-conditional images after T steps, each step run by the block that owns its sigma
(DiffusionBlocks, ``model.blockwise``) or by every layer (the end-to-end baseline)."""

from __future__ import annotations

import torch

from ..maths.edm import initial_state, sigma_grid
from ..maths.sampler import run_sampler


def step_block(model, sigma: float) -> int | None:
    """The block a sampler step at ``sigma`` runs (None: all layers, the dense baseline)."""
    return model.partition.owner(sigma) if model.blockwise else None


def grid(model, num_steps: int) -> list[float]:
    return sigma_grid(num_steps, model.schedule, model.diffusion.grid, model.diffusion.grid_sigma_last or None)


def run_grid(model, denoise, shape, num_steps: int, generator: torch.Generator, device):
    """The solver from pure noise; ``denoise(z, sigma, block_index) -> (Dhat, output)`` runs one step."""
    steps = grid(model, num_steps)
    z = initial_state(shape, steps[0], model.sigma_data, generator, device)
    return run_sampler(lambda state, sigma: denoise(state, sigma, step_block(model, sigma)), z, steps,
                       model.diffusion.solver, noise=lambda size: torch.randn(size, generator=generator))


@torch.no_grad()
def classify(model, images, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """The ViT's logits after T sampler steps on the label token; dense: one pass (T is ignored)."""
    if not model.blockwise:
        return model.dense_logits(images)

    def denoise(z, sigma, block_index):
        logits = model(images, z, torch.full((len(z),), sigma, device=z.device), block_index)
        return model.soft_denoised(logits).to(z.dtype), logits

    return run_grid(model, denoise, (len(images), model.config.d_model), num_steps, generator, images.device)


@torch.no_grad()
def generate_images(model, labels: torch.Tensor, num_steps: int, cfg_scale: float, generator: torch.Generator):
    """The DiT's class-conditional images in [-1, 1] after T steps from pure noise."""
    m = model.config

    def denoise(z, sigma, block_index):
        denoised = model.guided(z, torch.full((len(z),), sigma, device=z.device), labels, cfg_scale, block_index)
        return denoised, denoised

    shape = (len(labels), m.channels, m.image_size, m.image_size)
    return run_grid(model, denoise, shape, num_steps, generator, labels.device).clamp(-1, 1)
