"""Cached generation with a next-token model at any loop count.

K loops per new token; the model's sampler (loopdb.sampling) says what a loop is.
"""

from __future__ import annotations

import time

import torch

from ..sampling import RECURRENT
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
             last_cache_only: bool = False, stats: dict | None = None, sampler=None) -> list[int]:
    """Sample ``max_new_tokens`` after ``prompt``; returns the new token ids (one prompt of generate_batch;
    ``sampler``: see there).

    A sequence-recurrent model (``model.sequence_recurrence``) decodes with one cache per loop
    (``_generate_recurrent``): ``exit_rule`` (loopdb.maths.exit) stops each token's loops early,
    ``last_cache_only`` is Ouro's one-cache shortcut, and ``stats`` receives the mean loops used
    and the cache's size."""
    if model.loop == "joint":
        _check_request([prompt], num_loops)
        return _generate_joint(model, [prompt[-model.config.context:]], max_new_tokens, num_loops, temperature,
                               top_k, [seed], use_cache)[0]
    if model.sequence_recurrence:
        _check_request([prompt], num_loops)
        return _generate_recurrent(model, [prompt[-model.config.context:]], max_new_tokens, num_loops, temperature,
                                   top_k, [seed], use_cache, exit_rule, last_cache_only, stats)[0]
    if exit_rule is not None or last_cache_only:
        raise ValueError("adaptive exit and the last-loop cache apply to sequence-recurrent models "
                         "(objective bptt or ouro with recurrence=sequence)")
    return generate_batch(model, [prompt], max_new_tokens, num_loops, temperature, top_k, [seed], use_cache,
                          sampler=sampler)[0]


def _check_request(prompts, num_loops: int) -> None:
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("generation needs non-empty prompts (the model predicts the token after each position)")
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, num_loops: int, temperature: float = 1.0,
                   top_k: int | None = None, seeds: list[int] | int = 0, use_cache: bool = True,
                   stats: dict | None = None, sampler=None) -> list[list[int]]:
    """Sample ``max_new_tokens`` after each of ``prompts`` at once; returns each row's new token ids.

    With the cache, each new token costs one clean-stream step plus ``num_loops``
    noisy-stream steps against ONE cache of clean keys/values per layer (its size
    does not depend on num_loops). Without it, the clean stream is recomputed over
    the whole window each token: same tokens, slower (a test checks they agree).

    Prompts of unequal length are LEFT-padded: every row's new token sits in the same last
    slot, and a row's positions start at 0 at its first real token (the model hides the
    padding), so row i gives what ``generate(prompts[i], seed=seeds[i])`` gives alone (a test
    checks it; ``seeds``: one per row, or one for all). The initial states and the token
    draws come from the row's own generator; a sampler that draws along the way (ancestral
    steps, sampled estimates) draws from row 0's when batched. When the window fills, it
    slides for all rows at once: the last half of the slots is re-encoded. A sequence-recurrent model
    (per-loop caches) and a sequence-joint one take no padding: their rows of one prompt length decode
    together, one batch per length, each row as it would alone. ``stats`` receives
    ``prefill_seconds``, the time of the cache's first pass over the prompts (0 without the cache:
    every token recomputes the context), so decoding speed can be told apart from prompt speed.
    ``sampler`` (default: the model's, loopdb.sampling) says what a loop is, e.g. the anchor head's
    dense readout (loopdb.sampling.anchor_sampler).
    """
    _check_request(prompts, num_loops)
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if model.loop == "joint":
        return _by_prompt_length(model, prompts, seeds, lambda rows, row_seeds: _generate_joint(
            model, rows, max_new_tokens, num_loops, temperature, top_k, row_seeds, use_cache))
    if model.sequence_recurrence:
        return _by_prompt_length(model, prompts, seeds, lambda rows, row_seeds: _generate_recurrent(
            model, rows, max_new_tokens, num_loops, temperature, top_k, row_seeds, use_cache, None, False, None))
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    window = model.config.context
    prompts = [list(prompt[-window:]) for prompt in prompts]  # what fits in the window
    longest = max(len(prompt) for prompt in prompts)
    pad = torch.tensor([longest - len(prompt) for prompt in prompts], device=device)
    slots = torch.tensor([[0] * (longest - len(prompt)) + prompt for prompt in prompts], device=device)  # (B, L)

    def encode_window():
        return model.encode(slots, pad=pad if bool(pad.any()) else None)  # no padding: the causal fast path

    started = time.perf_counter()
    context = encode_window() if use_cache else None
    if stats is not None:
        stats["prefill_seconds"] = time.perf_counter() - started if use_cache else 0.0
    new_tokens = [[] for _ in prompts]
    width = model.config.d_model
    for _ in range(max_new_tokens):
        if not use_cache:
            context = encode_window()
        rows = [scoring.initial_noise(model, (1, 1, width), num_loops, generator, device, sampler)
                for generator in generators]
        z = None if rows[0] is None else torch.cat(rows)  # (B, 1, C)
        logits = scoring.loop_logits(model, context, z, num_loops, generators[0], sampler)[:, -1]  # (B, V)
        column = [sample_next_token(logits[row], temperature, top_k, generator)
                  for row, generator in enumerate(generators)]
        for row, token in enumerate(column):
            new_tokens[row].append(token)
        column = torch.tensor(column, device=device)[:, None]
        slots = torch.cat([slots, column], dim=1)
        if slots.shape[1] > window:  # slide the window: keep the last half
            dropped = slots.shape[1] - window // 2
            slots, pad = slots[:, dropped:], (pad - dropped).clamp_min(0)
            if use_cache:
                context = encode_window()
        elif use_cache:
            context = model.encode(column, cache=context)
    return new_tokens


def _by_prompt_length(model, prompts, seeds, generate_rows) -> list[list[int]]:
    """The rows of a sequence-recurrent or sequence-joint model, decoded together where their prompts fill
    the same part of the window (the same positions, the window sliding at the same token): one call of
    ``generate_rows(prompts, seeds)`` per prompt length, the rows returned in the order given. These
    models take no padding, so rows of other lengths go in another call."""
    window = model.config.context
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(min(len(prompt), window), []).append(index)
    new_tokens = [None] * len(prompts)
    for indices in groups.values():
        rows = generate_rows([prompts[i][-window:] for i in indices], [seeds[i] for i in indices])
        for index, row in zip(indices, rows):
            new_tokens[index] = row
    return new_tokens


def _generate_recurrent(model, prompts, max_new_tokens, num_loops, temperature, top_k, seeds, use_cache,
                        exit_rule, last_cache_only, stats):
    """Sequence recurrence, for prompts of one length within the window, decoded together: each new
    token runs up to ``num_loops`` loops, its state attending at loop k to the earlier positions' loop-k
    keys/values (the cache); without the cache every position is recomputed per token. A row's initial
    states and token draws come from its own seed, so a row gives what it gives alone. The window slides
    like ``generate``'s."""
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    window = model.config.context
    rows, new_tokens, loops, cache = [list(prompt) for prompt in prompts], [[] for _ in prompts], [], None
    start, pending = 0, len(rows[0])  # the window's first position; how many of its last are not in the cache
    for _ in range(max_new_tokens):
        length = len(rows[0])
        if cache is None or not use_cache:
            cache, pending = model.new_cache(last_only=last_cache_only), length - start
        first = length - pending - start
        state = torch.cat([RECURRENT.position_states(model, seed, first, pending, device) for seed in seeds])
        tokens = torch.tensor([row[length - pending:] for row in rows], device=device)
        logits, used = model.decode(tokens, cache, state, num_loops, exit_rule)
        loops += used[:, -1].tolist()
        for row, generator in enumerate(generators):
            token = sample_next_token(logits[row, -1], temperature, top_k, generator)
            rows[row].append(token)
            new_tokens[row].append(token)
        pending = 1
        if length + 1 - start > window:  # slide the window: keep the last half, rebuild the cache
            start, cache = length + 1 - window // 2, None
    if stats is not None:
        stats.update({"mean_loops": sum(loops) / max(1, len(loops)),
                      "cache_bytes": 0 if cache is None else cache.nbytes()})
    return new_tokens


def _generate_joint(model, prompts, max_new_tokens, num_loops, temperature, top_k, seeds, use_cache):
    """Sequence-joint DiffusionBlocks, for prompts of one length within the window, decoded together. A
    model whose targets are the next tokens (text) knows the target of every position but the newest:
    those sit at their clean targets in the context's cache (loopdb.models.joint) and each new token is
    one row sampled with ``num_loops`` loops against it; without the cache the context is rebuilt every
    token (same tokens, slower). A model trained on other targets (a reasoning task's running answers)
    denoises every position of the window jointly for each new token, as scoring does. A row's initial
    states and token draws come from its own seed; a sampler that draws along the way (ancestral
    steps, sampled estimates) draws from row 0's. The window slides like ``generate``'s."""
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    width, window = model.config.d_model, model.config.context
    known = model.targets_are_next_tokens
    rows, new_tokens = [list(prompt) for prompt in prompts], [[] for _ in prompts]
    start = 0

    def window_tokens():
        return torch.tensor([row[start:] for row in rows], device=device)

    context = model.encode(window_tokens(), known=known)
    for _ in range(max_new_tokens):
        count = 1 if known else context.length
        z = torch.cat([scoring.initial_noise(model, (1, count, width), num_loops, generator, device)
                       for generator in generators])
        logits = scoring.loop_logits(model, context, z, num_loops, generators[0])[:, -1]
        column = [sample_next_token(logits[row], temperature, top_k, generator)
                  for row, generator in enumerate(generators)]
        for row, token in enumerate(column):
            rows[row].append(token)
            new_tokens[row].append(token)
        slide = len(rows[0]) - start > window
        if slide:  # keep the last half of the window
            start = len(rows[0]) - window // 2
        if known and use_cache and not slide:
            context = model.encode(torch.tensor(column, device=device)[:, None], cache=context)
        else:
            context = model.encode(window_tokens(), known=known)
    return new_tokens
