"""Readouts of the masked diffusion LM (loopdb.models.masked): the ELBO in bits per byte, each t
scored by the block that owns it; MD4's ancestral unmasking sampler is loopdb.sampling.masked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sampling.masked import SAMPLE_STEPS, block_for, sample_masked  # noqa: F401 (the CLI's sampler)
from .scoring import same_length_batches

ELBO_T_SAMPLES = 16  # draws per window in the ELBO (fixed, so numbers compare across runs)


def owned_logits(model, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) with each row run by the block that owns its t."""
    owners = [block_for(model, float(value)) for value in t]
    logits = None
    for block_index in dict.fromkeys(owners):
        rows = torch.tensor([i for i, owner in enumerate(owners) if owner == block_index], device=tokens.device)
        part = model(tokens[rows], t[rows], block_index)
        if logits is None:
            logits = part.new_empty((*tokens.shape, part.shape[-1]))
        logits[rows] = part
    return logits


# -- the ELBO ----------------------------------------------------------------------------------------
@torch.no_grad()
def elbo_nats(model, windows: torch.Tensor, t_samples: int = ELBO_T_SAMPLES,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) upper bound on -log p(window) in nats, for windows (B, L): the mean of ``t_samples``
    stratified draws of (L/m) * sum over the m masked positions of CE (module docstring)."""
    if t_samples < 1:
        raise ValueError(f"t_samples must be >= 1, got {t_samples}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch, length = windows.shape
    offset = torch.rand(batch, generator=generator, dtype=torch.float64)
    total = torch.zeros(batch, dtype=torch.float64)
    for k in range(t_samples):
        num_masked = ((k + offset) / t_samples * length).long().clamp(max=length - 1) + 1  # stratified in 1..L
        scores = torch.rand(batch, length, generator=generator)
        t = scores.sort(dim=1).values.gather(1, (num_masked - 1)[:, None])  # m-th smallest: Beta(m, L - m + 1)
        masked = (scores <= t).to(windows.device)  # exactly the m smallest
        logits = owned_logits(model, windows.masked_fill(masked, model.mask_id), t[:, 0].to(windows.device))
        cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), windows.flatten(),
                                        reduction="none").view(batch, length)
        total += (length / num_masked) * (cross_entropy * masked).sum(1).double().cpu()
    return total / t_samples


@torch.no_grad()
def elbo_bits_per_byte(model, windows: list[torch.Tensor], token_bytes: torch.Tensor,
                       t_samples: int = ELBO_T_SAMPLES, seed: int = 0, batch_size: int = 16, device="cpu",
                       progress=None) -> dict:
    """ELBO over ``windows`` (each (L,) tokens, all scored): {"bpb", "nats", "tokens", "bytes"}.
    Same seed -> same masks and times -> same number."""
    generator = torch.Generator().manual_seed(seed)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for batch in same_length_batches(windows, batch_size, device, progress):
        total_nats += elbo_nats(model, batch, t_samples, generator).sum().item()
        total_bytes += int(token_bytes[batch.cpu()].sum())
        total_tokens += batch.numel()
    return {"bpb": total_nats / math.log(2) / max(total_bytes, 1), "nats": total_nats, "tokens": total_tokens,
            "bytes": total_bytes}
