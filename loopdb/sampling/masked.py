"""MD4's ancestral unmasking sampler of the masked diffusion LM (loopdb.models.masked), and which
block runs a time t: the block that owns it (DiffusionBlocks) or every layer (the dense baseline)."""

from __future__ import annotations

import torch

SAMPLE_STEPS = 64    # default sampler steps


def block_for(model, t: float) -> int | None:
    """The block that runs time t: its owner in the partition, or None (every layer) for a dense model."""
    return model.partition.owner(t) if model.blockwise else None


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """One token per position from logits (B, L, V); temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).flatten(0, 1).cpu()
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


@torch.no_grad()
def sample_masked(model, length: int, num_steps: int = SAMPLE_STEPS, prompt: list[int] = (), num_samples: int = 1,
                  temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_samples, length) token ids: ``num_steps`` ancestral unmasking steps from an all-mask
    sequence whose first tokens are fixed to ``prompt``; each step runs the block that owns its t."""
    if num_steps < 1:
        raise ValueError(f"the number of sampler steps must be >= 1, got {num_steps}")
    if not len(prompt) <= length <= model.config.context:
        raise ValueError(f"cannot sample {length} tokens after a {len(prompt)}-token prompt with a "
                         f"{model.config.context}-token model")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    tokens = torch.full((num_samples, length), model.mask_id, dtype=torch.long, device=device)
    tokens[:, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
    for step in range(num_steps):
        t, s = (num_steps - step) / num_steps, (num_steps - step - 1) / num_steps  # exact on the b/B boundaries
        masked = tokens == model.mask_id
        if not masked.any():
            break
        times = torch.full((num_samples,), t, device=device)
        proposal = _draw(model(tokens, times, block_for(model, t)), temperature, top_k, generator)
        reveal = masked & (torch.rand(tokens.shape, generator=generator) < (t - s) / t).to(device)
        tokens = torch.where(reveal, proposal, tokens)
    return tokens
