"""Objectives of the masked diffusion LM (MD4, docs/method.md#masked-diffusion): DiffusionBlocks over t, or the
end-to-end baseline. The loss and the block <-> t assignment are documented in loopdb.models.masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stratified_times(count: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` times in (lo, hi], one per equal stratum (MD4's low-discrepancy sampler)."""
    u = (torch.arange(count, dtype=torch.float64) + torch.rand(1, generator=generator, dtype=torch.float64)) / count
    return (hi - u * (hi - lo)).float()


def md4_loss(model, tokens: torch.Tensor, t: torch.Tensor, block_index: int | None, generator: torch.Generator):
    """MD4's loss at times t (B,): mask each position with probability t, then
    (1/t) * sum over masked positions of CE, per sequence, / L. Returns (loss, mean masked CE)."""
    masked = (torch.rand(tokens.shape, generator=generator) < t[:, None].cpu()).to(tokens.device)
    logits = model(tokens.masked_fill(masked, model.mask_id), t, block_index)
    cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    masked_ce = (cross_entropy * masked).sum(1)  # (B,)
    loss = (masked_ce / t / tokens.shape[1]).mean()  # weight -alpha'(t) / (1 - alpha(t)) = 1/t
    return loss, masked_ce.sum().detach() / masked.sum().clamp(min=1)


class MaskedDiffusionObjective:
    """DiffusionBlocks: each step trains one block, uniformly drawn, on t inside its range."""

    def training_block(self, model, generator) -> tuple[int | None, float, float]:
        block_index = int(torch.randint(model.num_blocks, (1,), generator=generator))
        return (block_index, *model.partition.training_range(block_index))

    def loss(self, model, tokens: torch.Tensor, generator: torch.Generator, step: int = 0):
        """tokens: (B, L) clean windows. All randomness comes from ``generator``."""
        block_index, lo, hi = self.training_block(model, generator)
        t = stratified_times(tokens.shape[0], lo, hi, generator).to(tokens.device)
        loss, masked_ce = md4_loss(model, tokens, t, block_index, generator)
        stats = {"ce": masked_ce}
        if block_index is not None:
            stats["block"] = torch.tensor(float(block_index))
        return loss, stats


class MaskedDenseObjective(MaskedDiffusionObjective):
    """The end-to-end baseline: every layer stacked, trained at every t in (0, 1]."""

    def training_block(self, model, generator):
        return None, 0.0, 1.0


def make_masked_objective(objective: str):
    if objective == "diffusion":
        return MaskedDiffusionObjective()
    if objective == "dense":
        return MaskedDenseObjective()
    raise ValueError(f"the mdm family trains with objective diffusion or dense, not {objective!r}")
