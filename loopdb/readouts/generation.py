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
             top_k: int | None = None, seed: int = 0, use_cache: bool = True, exit_rule=None,
             last_cache_only: bool = False, stats: dict | None = None) -> list[int]:
    """Sample ``max_new_tokens`` after ``prompt``; returns the new token ids.

    A sequence-recurrent model (``model.sequence_recurrence``) decodes with one cache per loop
    (``_generate_recurrent``): ``exit_rule`` (loopdb.maths.exit) stops each token's loops early,
    ``last_cache_only`` is Ouro's one-cache shortcut, and ``stats`` receives the mean loops used
    and the cache's size.

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
    if getattr(model, "sequence_recurrence", False):
        return _generate_recurrent(model, prompt, max_new_tokens, num_loops, temperature, top_k, seed, use_cache,
                                   exit_rule, last_cache_only, stats)
    if exit_rule is not None or last_cache_only:
        raise ValueError("adaptive exit and the last-loop cache apply to sequence-recurrent models "
                         "(objective bptt or ouro with recurrence=sequence)")
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


def initial_states(seed: int, start: int, count: int, width: int, device) -> torch.Tensor:
    """(1, count, width) random initial states of positions start..start+count-1, each drawn from its
    own generator seeded by (seed, position): a position starts the same whether it is decoded
    with a cache or recomputed, so cached and uncached generation agree."""
    rows = [torch.randn(width, generator=torch.Generator().manual_seed((seed * 1_000_003 + position) % 2**63))
            for position in range(start, start + count)]
    return torch.stack(rows)[None].to(device)


def _generate_recurrent(model, prompt, max_new_tokens, num_loops, temperature, top_k, seed, use_cache,
                        exit_rule, last_cache_only, stats):
    """Sequence recurrence: each new token runs up to ``num_loops`` loops, its state attending at
    loop k to the earlier positions' loop-k keys/values (the cache); without the cache every
    position is recomputed per token. The window slides like ``generate``'s."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    width, window = model.config.d_model, model.config.context
    tokens, new_tokens, loops, cache = list(prompt), [], [], None
    start = max(0, len(tokens) - window)
    pending = tokens[start:]  # tokens not yet in the cache
    for _ in range(max_new_tokens):
        if cache is None or not use_cache:
            cache, pending = model.new_cache(last_only=last_cache_only), tokens[start:]
        state = initial_states(seed, len(tokens) - len(pending) - start, len(pending), width, device)
        logits, used = model.decode(torch.tensor([pending], device=device), cache, state, num_loops, exit_rule)
        loops.append(float(used[0, -1]))
        token = sample_next_token(logits[0, -1], temperature, top_k, generator)
        tokens.append(token)
        new_tokens.append(token)
        pending = [token]
        if len(tokens) - start > window:  # slide the window: keep the last half, rebuild the cache
            start, cache = len(tokens) - window // 2, None
    if stats is not None:
        stats.update({"mean_loops": sum(loops) / max(1, len(loops)),
                      "cache_bytes": 0 if cache is None else cache.nbytes()})
    return new_tokens
