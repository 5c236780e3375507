"""Sequence-joint DiffusionBlocks in an exported loopdb model (`loopdb export` writes this file beside
hf_modeling.py); repeats loopdb.models.joint and its sampler (loopdb.sampling.JointSampler) operation for
operation. Imports torch and transformers only.

The loop state at position t is a noisy copy of t's own target (the normalised embedding of the token t
predicts); the core, conditioned per position on its sigma, attends causally over every position's state,
so what an earlier position has resolved flows forward one loop at a time. K loops = K Euler (or
ancestral) steps with a sigma per position: the grid, or a wavefront across positions.

A known prefix (``known_prefix``, a text LM): every position but the newest knows its target, the token
after it; those positions enter as their clean targets at the grid's last sigma, their core and coda
keys/values are cached once, and each position is then denoised as one row against the prefix before it.
Without it (a reasoning task, whose running answers are not in the input) every position is denoised jointly;
with ``prompt_openers`` the task's prompt (the positions before the first of those tokens) sits at its clean
placeholder target (token 0) at the last sigma in every denoiser call.
"""

from __future__ import annotations

import torch

from .hf_layers import LoopDBCache, inject, position_sigmas, rotary_angles, sigma_last


def joint_positions(config, start: int, length: int, cached: int, alone: bool, device):
    """cos, sin and mask of rows [start, start + length) reading ``cached`` cached keys (those before each
    row's position) and their own rows: causally, or with ``alone`` each row itself only. mask None
    (nothing cached, from position 0): the plain causal fast path."""
    queries = torch.arange(start, start + length, device=device)
    cos, sin = rotary_angles(queries, config.d_model // config.n_heads, config.context)
    if cached == 0 and start == 0:
        return cos, sin, None
    prefix = torch.arange(cached, device=device)
    own = queries[None, :] == queries[:, None] if alone else queries[None, :] <= queries[:, None]
    return cos, sin, torch.cat([prefix[None, :] < queries[:, None], own], dim=1)


def joint_encode(model, input_ids, sampler: dict, context: dict | None = None) -> dict:
    """The context of ``input_ids`` (B, T), appended to ``context`` if given: the prelude over every position
    and, with a known prefix, every position but the newest committed at its clean target."""
    config, length, device = model.config, input_ids.shape[1], input_ids.device
    if context is None and not config.known_prefix:
        cos, sin, _ = joint_positions(config, 0, length, 0, False, device)
        embedded, _ = model._run(model.prelude, model.embedding(input_ids), cos, sin)
        prompt = None
        if config.prompt_openers:
            opener = torch.zeros(config.vocab_size, dtype=torch.bool, device=device)
            opener[list(config.prompt_openers)] = True
            prompt = opener[input_ids].cumsum(1) == 0
        return {"embedded": embedded, "length": length, "committed": 0, "cache": None, "prompt": prompt}
    start = 0 if context is None else context["length"]
    cache = LoopDBCache(config, 1) if context is None else context["cache"]
    cos, sin, mask = joint_positions(config, start, length, start, False, device)
    slots = [cache.slot("prelude", index) for index in range(len(model.prelude))]
    embedded, _ = model._run(model.prelude, model.embedding(input_ids), cos, sin, mask=mask, cache=cache, slots=slots)
    if context is not None:
        embedded = torch.cat([context["embedded"], embedded], 1)
    context = {"embedded": embedded, "length": start + length, "cache": cache,
               "committed": 0 if context is None else context["committed"]}
    return _commit(model, context, input_ids if start else input_ids[:, 1:], sampler)


def _conditioned_input(model, state, sigma, embedded):
    """The core's input and per-row condition for states at noise levels sigma (B, n): EDM's c_in z (or the
    linear posterior mean c_skip z / sigma_data with state_input "wiener") and c_noise."""
    variance = sigma**2 + model.sigma_data**2
    scale = model.sigma_data / variance if model.config.state_input == "wiener" else 1.0 / torch.sqrt(variance)
    hidden = inject(model.injection, scale[..., None] * state, embedded)
    return hidden, model.sigma_embedder(torch.log(sigma) / 4).to(hidden.dtype)


def _commit(model, context: dict, targets, sampler: dict) -> dict:
    """Cache the next ``targets.shape[1]`` positions after the committed ones at their clean targets."""
    count, start, cache = targets.shape[1], context["committed"], context["cache"]
    if count == 0:
        return context
    sigma = torch.full(targets.shape, sigma_last(model.config, sampler), device=targets.device)
    cos, sin, mask = joint_positions(model.config, start, count, start, False, targets.device)
    hidden, cond = _conditioned_input(model, model._target_table()[targets], sigma,
                                      context["embedded"][:, start:start + count])
    hidden, _ = model._run(model.core, hidden, cos, sin, cond, mask=mask, cache=cache,
                           slots=[cache.slot("core", index) for index in range(len(model.core))])
    model._run(model.coda, hidden, cos, sin, mask=mask, cache=cache,
               slots=[cache.slot("coda", index) for index in range(len(model.coda))])
    return {**context, "committed": start + count}


def joint_denoise(model, z, sigma, context: dict, sampler: dict):
    """Logits (B, n, V) of the denoiser for the states z (B, n, C) of the context's last n positions at
    noise levels ``sigma`` (1, n): rows read each other causally, or with a known prefix the prefix
    before them and themselves."""
    batch, length = z.shape[:2]
    sigma = sigma.expand(batch, length)
    committed, cache = context["committed"], context["cache"]
    start = context["length"] - length
    if context.get("prompt") is not None:  # the prompt held at its clean placeholder at the last sigma
        held = context["prompt"][:, start:, None]
        z = torch.where(held, model._target_table()[0].to(z.dtype), z)
        sigma = torch.where(held[..., 0], sigma_last(model.config, sampler), sigma)
    cos, sin, mask = joint_positions(model.config, start, length, committed, committed > 0, z.device)
    hidden, cond = _conditioned_input(model, z, sigma, context["embedded"][:, start:])

    def prefixes(stream, layers):
        return None if cache is None else [cache.past(cache.slot(stream, index)) for index in range(len(layers))]

    hidden, _ = model._run(model.core, hidden, cos, sin, cond, prefixes("core", model.core), mask)
    hidden, _ = model._run(model.coda, hidden, cos, sin, None, prefixes("coda", model.coda), mask)
    return model._logits(hidden)


def joint_loops(model, context: dict, z, num_loops: int, generator, states: list, sampler: dict):
    """K solver steps (euler or ancestral) from z with a sigma per position; the last step's logits."""
    if sampler["solver"] not in ("euler", "ancestral"):
        raise ValueError(f"solver={sampler['solver']!r}: sequence-joint DiffusionBlocks samples with euler or ancestral")
    grid = list(position_sigmas(model.config, num_loops, z.shape[1], sampler).to(z.device)[..., None])  # K x (T, 1)
    for index, sigma in enumerate(grid):
        logits = joint_denoise(model, z, sigma.view(1, -1), context, sampler)
        denoised = model._estimate(logits, generator, sampler["estimate"]).to(z.dtype)
        if index + 1 == len(grid):
            return logits
        sigma_next = grid[index + 1]
        if sampler["solver"] == "ancestral":
            z = denoised + sigma_next * torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        else:
            z = z + (sigma_next - sigma) * (z - denoised) / sigma
        states.append(z)
    return logits


class JointRow:
    """One row of ``generate`` (loopdb's ``_generate_joint``): its window and generator. With a known prefix
    each new token is one row sampled against the cached prefix, which grows by one committed position
    per token (without ``use_cache`` the window is re-encoded instead); else every position of the
    window is denoised jointly for each token."""

    def __init__(self, model, prompt, seed, num_loops, use_cache: bool, sampler: dict):
        self.model, self.num_loops, self.use_cache, self.sampler = model, num_loops, use_cache, sampler
        self.generator, self.loops_used, self.hidden = torch.Generator().manual_seed(seed), [], None
        self.tokens = list(prompt)
        self.start = max(0, len(self.tokens) - model.config.context)
        self.context = self._encode_window()

    def _encode_window(self):
        device = self.model.embedding.weight.device
        return joint_encode(self.model, torch.tensor([self.tokens[self.start:]], device=device), self.sampler)

    def next_logits(self) -> torch.Tensor:
        model = self.model
        rows = 1 if model.config.known_prefix else self.context["length"]
        z = model._initial_state((1, rows, model.config.d_model), self.num_loops, self.generator,
                                 model.embedding.weight.device)
        self.loops_used.append(self.num_loops)
        states = []
        logits = joint_loops(model, self.context, z, self.num_loops, self.generator, states, self.sampler)
        self.hidden = (self.context["embedded"][:, -1:], *(state[:, -1:] for state in states))
        return logits[0, -1]

    def append(self, token: int) -> None:
        self.tokens.append(token)
        window = self.model.config.context
        slide = len(self.tokens) - self.start > window
        if slide:  # keep the last half of the window
            self.start = len(self.tokens) - window // 2
        if self.model.config.known_prefix and self.use_cache and not slide:
            self.context = joint_encode(self.model, torch.tensor([[token]], device=self.model.embedding.weight.device),
                                        self.sampler, self.context)
        else:
            self.context = self._encode_window()
