"""Training objectives for the looped LM.

DiffusionBlocks (METHOD 3.1): one sigma per sequence from the truncated
log-normal, ONE forward/backward pass through prelude, core (once) and coda,
loss w(sigma) * CE(head(C(D)), x_{t+1}). No unrolling over loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .edm import loss_weight


def diffusion_blocks_loss(model, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """tokens: (B, T+1). Noise is drawn from ``generator`` (CPU) so a step is reproducible."""
    inputs, next_tokens = tokens[:, :-1], tokens[:, 1:]
    batch = tokens.shape[0]
    sigma = model.schedule.sample(batch, generator).to(tokens.device)
    targets = model.targets(next_tokens)  # (B, T, C) unit-norm
    noise = torch.randn(targets.shape, generator=generator).to(targets.device, targets.dtype)
    noisy = targets + sigma[:, None, None] * noise
    logits = model(inputs, noisy, sigma)
    cross_entropy = F.cross_entropy(
        logits.float().flatten(0, 1), next_tokens.flatten(), reduction="none"
    ).view(batch, -1).mean(dim=1)  # (B,) one value per sequence, i.e. per sigma
    diffusion = model.diffusion
    weight = loss_weight(sigma, model.sigma_data, diffusion.loss_weight, diffusion.loss_weight_clamp or None)
    loss = (weight * cross_entropy).mean()
    return loss, {"ce": cross_entropy.mean().detach(), "weight": weight.mean().detach()}
