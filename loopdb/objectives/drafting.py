"""DiffusionBlocks with a draft of L future tokens per position and a dense anchor head (docs/results/drafting.md).

At position t the model denoises L slots jointly, the embeddings of tokens t+1..t+L
(``LoopedLM.denoise_draft``), so the denoised object has dependent coordinates and K
loops can pay (docs/method.md#looped-lm, last point). Training is still ONE forward/backward pass:

    loss = w(sigma) * mean over drafting positions and slots of CE(slot logits, token)
         + anchor_weight * CE(head(C(clean stream)), x_{t+1})

- one sigma per sequence (the looped recipe's, ``DiffusionObjective.training_sigmas``);
- drafting positions: every t whose L targets lie in the window (t <= T - L), or a
  sampled share ``draft_fraction`` of them (the same positions for the whole batch);
- the anchor is the dense next-token CE of the clean stream, which every DiffusionBlocks
  step computes anyway (prelude, core with the clean conditioning, coda): one head matmul.

With L = 1, draft_fraction = 1 and anchor_weight = 0 this is DiffusionObjective's loss,
bit for bit (a test checks it). Inference is the diffusion sampler's (loopdb.sampling): with
L > 1 every loop denoises the L slots of each position together and the next-token readouts
(predictive, generation) read slot 0.
"""

from __future__ import annotations

import torch

from ..maths.edm import loss_weight
from .next_token import DiffusionObjective, _cross_entropy, mean_cross_entropy


class DraftDiffusionObjective(DiffusionObjective):
    def __init__(self, anchor_weight: float = 0.0, draft_fraction: float = 1.0):
        self.anchor_weight, self.draft_fraction = anchor_weight, draft_fraction

    def loss(self, model, tokens: torch.Tensor, generator: torch.Generator, step: int = 0):
        """tokens: (B, T+1); all randomness from ``generator`` (sigma, then noise, then positions)."""
        width = model.draft_width
        inputs = tokens[:, :-1]
        batch, length = inputs.shape
        count = length - width + 1  # positions whose L targets are inside the window
        targets = draft_targets(tokens, width)  # (B, count, L)
        sigma = self.training_sigmas(model, batch, generator).to(tokens.device)
        clean = model.targets(targets)
        noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
        noisy = clean + sigma[:, None, None, None] * noise
        positions = torch.arange(count, device=tokens.device)
        if self.draft_fraction < 1:
            keep = max(1, round(self.draft_fraction * count))
            chosen = torch.randperm(count, generator=generator)[:keep].sort().values.to(tokens.device)
            positions, noisy, targets = positions[chosen], noisy[:, chosen], targets[:, chosen]
        context = model.encode(inputs)
        logits = model.denoise_draft(noisy, sigma, context, positions)  # (B, P, L, V)
        cross_entropy = _cross_entropy(logits.flatten(1, 2), targets.flatten(1, 2))  # per sequence
        diffusion = model.diffusion
        weight = loss_weight(sigma, model.sigma_data, diffusion.loss_weight, diffusion.loss_weight_clamp or None)
        loss = (weight * cross_entropy).mean()
        stats = {"ce": cross_entropy.mean().detach(), "weight": weight.mean().detach()}
        if self.anchor_weight > 0:
            anchor = mean_cross_entropy(model.dense_logits(context), tokens[:, 1:])
            loss = loss + self.anchor_weight * anchor
            stats["anchor_ce"] = anchor.detach()
        return loss, stats


def draft_targets(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T+1) -> (B, T-L+1, L): row t holds tokens t+1..t+L, the targets of position t's slots."""
    return tokens[:, 1:].unfold(1, width, 1)
