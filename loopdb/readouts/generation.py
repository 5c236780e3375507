"""Cached generation with a next-token model at any loop count.

K loops per new token; the model's objective (loopdb.objectives) says what a loop is.
"""

from __future__ import annotations

import torch

from . import scoring


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from logits (V,): the argmax at temperature 0, else a draw (top-k if given)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, num_loops: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, use_cache: bool = True) -> list[int]:
    """Sample ``max_new_tokens`` after ``prompt``; returns the new token ids.

    With the cache, each new token costs one clean-stream step plus ``num_loops``
    noisy-stream steps against ONE cache of clean keys/values per layer (its size
    does not depend on num_loops). Without it, the clean stream is recomputed over
    the whole window each token: same tokens, slower (a test checks they agree).
    When the window fills, it slides: the last half is re-encoded.
    """
    if not prompt:
        raise ValueError("generation needs a non-empty prompt (the model predicts the token after each position)")
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    window = model.config.context
    tokens = list(prompt)
    start = max(0, len(tokens) - window)
    context = model.encode(torch.tensor([tokens[start:]], device=device)) if use_cache else None
    new_tokens = []
    for _ in range(max_new_tokens):
        if not use_cache:
            context = model.encode(torch.tensor([tokens[start:]], device=device))
        z = scoring.initial_noise(model, (1, 1, model.config.d_model), num_loops, generator, device)
        logits = scoring.loop_logits(model, context, z, num_loops, generator)[0, -1]
        token = sample_next_token(logits, temperature, top_k, generator)
        tokens.append(token)
        new_tokens.append(token)
        if len(tokens) - start > window:  # slide the window: keep the last half
            start = len(tokens) - window // 2
            if use_cache:
                context = model.encode(torch.tensor([tokens[start:]], device=device))
        elif use_cache:
            context = model.encode(torch.tensor([[token]], device=device), cache=context)
    return new_tokens
