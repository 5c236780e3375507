"""Readouts of a drafting looped LM (draft width L > 1): the block ELBO, parallel
decoding and self-speculative decoding with the dense anchor head.

- Block ELBO: the K-step discrete diffusion bound (loopdb.maths.elbo) on -log p of the
  L-token block x_{t+1..t+L} given x_{<=t}, for the blocks at t = 0, L, 2L, ... of a window
  (they tile its tokens). The L slots are one object denoised jointly, so every term of the
  bound is a sum over the L slots of the JOINT estimate's errors. At K = 1 (one evaluation
  at sigma_max) the bound is the sum of the L marginal cross-entropies; a model whose slots
  depend on one another tightens it with K. Beside it: the anchor head's exact
  autoregressive NLL of the same tokens.
- Parallel decoding: L tokens per K loops (each slot's token drawn from its last logits),
  then one clean-stream pass over the L new tokens.
- Self-speculative decoding: the anchor's greedy next token a_0 is known from the clean
  stream; the drafter runs K loops on the L slots of the last position with slot 0 pinned
  to a_0 (replacement: z_0 = y(a_0) + sigma * eps at every step, the training marginal) and
  proposes the L-1 tokens after it. ONE clean-stream pass over [a_0, d_1 .. d_{L-1}] gives
  the anchor's greedy choice after every prefix; the longest prefix of drafts equal to
  those choices is accepted, and the anchor's choice after it is the next round's a_0. Every
  emitted token is the anchor's greedy token given the tokens before it, so the output is
  exactly greedy decoding with the anchor head (``generate(model, ..., sampler=anchor_sampler(model))``
  at temperature 0), window sliding included (a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..maths.elbo import discrete_elbo
from ..objectives.drafting import draft_targets
from ..sampling import DIFFUSION, sampler_of
from .generation import sample_next_token
from .scoring import same_length_batches


def _require_drafts(model) -> int:
    width = model.draft_width
    if width < 2 or sampler_of(model) is not DIFFUSION:
        raise ValueError("this readout needs a looped DiffusionBlocks model trained with draft_width > 1 "
                         "(e.g. `loopdb train --preset demo-draft`)")
    return width


# -- block ELBO ---------------------------------------------------------------------------------------
@torch.no_grad()
def block_bounds(model, windows: torch.Tensor, num_loops: int, generator: torch.Generator):
    """For windows (B, T+1): (bound, anchor), each (B, P) in nats, for the P = T // L blocks
    at t = 0, L, ..., covering tokens 1..P*L: the K-step block ELBO and the anchor head's
    exact autoregressive NLL of the same block."""
    width = _require_drafts(model)
    inputs = windows[:, :-1]
    count = inputs.shape[1] // width
    positions = torch.arange(count, device=windows.device) * width
    context = model.encode(inputs)
    tokens = draft_targets(windows, width)[:, positions]  # (B, P, L)
    targets = model.targets(tokens)

    def denoise(z, sigma):
        logits = model.denoise_draft(z, sigma, context, positions)
        return model.soft_denoised(logits), logits

    bound = discrete_elbo(denoise, targets, tokens, DIFFUSION.grid(model, num_loops), model.sigma_data,
                          generator).sum(-1)
    anchor_logprobs = torch.log_softmax(model.dense_logits(context).float(), -1)
    anchor_logprobs = anchor_logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1)[:, :count * width]
    return bound, -anchor_logprobs.view(-1, count, width).sum(-1)


@torch.no_grad()
def block_elbo_bits_per_byte(model, windows: list[torch.Tensor], token_bytes: torch.Tensor, loops, samples: int = 1,
                             seed: int = 0, batch_size: int = 16, device="cpu") -> dict:
    """{"block_elbo": {K: bpb}, "anchor": bpb, "blocks": n} over the blocks of ``windows``; each K
    averages ``samples`` noise draws and restarts from ``seed`` (same seed -> same number)."""
    width = _require_drafts(model)
    bounds, anchor_nats, total_bytes, blocks = {}, 0.0, 0, 0
    for num_loops in loops:
        generator = torch.Generator().manual_seed(seed)
        nats = 0.0
        for batch in same_length_batches(windows, batch_size, device):
            if batch.shape[1] - 1 < width:
                continue  # a window too short for one block
            draws = [block_bounds(model, batch, num_loops, generator) for _ in range(samples)]
            nats += torch.stack([bound for bound, _ in draws]).mean(0).sum().item()
            if num_loops == loops[0]:
                anchor_nats += draws[0][1].sum().item()
                scored = batch[:, 1:1 + (batch.shape[1] - 1) // width * width]
                total_bytes += int(token_bytes[scored.cpu()].sum())
                blocks += draws[0][1].numel()
        bounds[num_loops] = nats
    to_bpb = 1 / math.log(2) / max(total_bytes, 1)
    return {"block_elbo": {k: v * to_bpb for k, v in bounds.items()}, "anchor": anchor_nats * to_bpb,
            "blocks": blocks, "draft_width": width, "samples": samples}


# -- drafting ------------------------------------------------------------------------------------------
@torch.no_grad()
def draft_logits(model, context, num_loops: int, generator: torch.Generator, pinned: int | None = None):
    """K sampler steps on the L slots of the last position of ``context``; returns the last
    step's logits (L, V). ``pinned``: the known token of slot 0, held at y + sigma * eps."""
    _require_drafts(model)
    device = context.embedded.device
    z = DIFFUSION.initial_state(model, (1, 1, model.config.d_model), num_loops, generator, device)  # (1, 1, L, C)
    if pinned is not None:
        known = model.targets(torch.tensor([pinned], device=device))  # (1, C)
        known_noise = torch.randn(known.shape, generator=generator).to(device, known.dtype)

    def denoise(state, sigma, previous):
        if pinned is not None:
            state = state.clone()
            state[:, :, 0] = known + sigma * known_noise
        return model.denoise_draft(state, sigma, context)

    logits = DIFFUSION.run_grid(model, context, z, DIFFUSION.grid(model, num_loops), generator, denoise=denoise)
    return logits[0, 0]


def greedy_drafter(model, context, next_token: int, num_loops: int, generator) -> list[int]:
    """The drafts after the known ``next_token``: argmax of slots 1..L-1."""
    return draft_logits(model, context, num_loops, generator, pinned=next_token)[1:].argmax(-1).tolist()


def truncate_context(context, length: int):
    """The clean-stream cache cut back to its first ``length`` positions (rejected drafts out)."""
    drop = context.length - length
    if drop == 0:
        return context
    cut = [(k[:, :, :length], v[:, :, :length]) for k, v in context.prelude_kv]
    new_rows = context.embedded.shape[1] - drop
    return replace(context, prelude_kv=cut,
                   core_kv=[(k[:, :, :length], v[:, :, :length]) for k, v in context.core_kv],
                   coda_kv=[(k[:, :, :length], v[:, :, :length]) for k, v in context.coda_kv],
                   embedded=context.embedded[:, :new_rows], final_hidden=context.final_hidden[:, :new_rows],
                   length=length)


def _anchor_choice(model, context) -> int:
    return int(model.dense_logits(context)[0, -1].argmax())


@torch.no_grad()
def speculative_generate(model, prompt: list[int], max_new_tokens: int, num_loops: int, seed: int = 0,
                         drafter=greedy_drafter) -> tuple[list[int], dict]:
    """Greedy decoding with the anchor head, drafted L at a time by K loops and verified in one
    clean pass (module docstring). Returns (new token ids, {"verifications", "accepted": list of
    drafts accepted per verification}). ``drafter(model, context, next_token, num_loops, generator)``
    proposes the tokens after ``next_token`` (tests pass their own)."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    width = _require_drafts(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    window = model.config.context
    tokens = list(prompt)
    start = max(0, len(tokens) - window)
    context = model.encode(torch.tensor([tokens[start:]], device=device))
    next_token = _anchor_choice(model, context)
    new_tokens, accepted = [], []
    while len(new_tokens) < max_new_tokens:
        # tokens verified in this pass: a_0 and its drafts, all inside the greedy decoder's window
        room = min(width, start + window - len(tokens), max_new_tokens - len(new_tokens))
        if room == 0:  # the window is full: emit a_0 and slide exactly as generation.generate does
            tokens.append(next_token)
            new_tokens.append(next_token)
            start = len(tokens) - window // 2
            context = model.encode(torch.tensor([tokens[start:]], device=device))
            next_token = _anchor_choice(model, context)
            continue
        drafts = drafter(model, context, next_token, num_loops, generator)[:room - 1] if room > 1 else []
        block = [next_token, *drafts]
        context = model.encode(torch.tensor([block], device=device), cache=context)
        choices = model.dense_logits(context)[0].argmax(-1).tolist()  # the anchor's token after each prefix
        matched = 0
        while matched < len(drafts) and drafts[matched] == choices[matched]:
            matched += 1
        if drafts:
            accepted.append(matched)
        tokens += block[:1 + matched]
        new_tokens += block[:1 + matched]
        context = truncate_context(context, len(tokens) - start)
        next_token = choices[matched]
    return new_tokens, {"verifications": len(accepted), "accepted": accepted}


@torch.no_grad()
def parallel_generate(model, prompt: list[int], max_new_tokens: int, num_loops: int, temperature: float = 1.0,
                      top_k: int | None = None, seed: int = 0) -> list[int]:
    """L tokens per K loops: each slot's token drawn from its last logits, then one clean pass
    over them. When the window would overflow, it slides (the last half is re-encoded)."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    width = _require_drafts(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    window = model.config.context
    tokens = list(prompt)[-window:]
    context = model.encode(torch.tensor([tokens], device=device))
    new_tokens = []
    while len(new_tokens) < max_new_tokens:
        logits = draft_logits(model, context, num_loops, generator)
        block = [sample_next_token(row, temperature, top_k, generator) for row in logits]
        block = block[:max_new_tokens - len(new_tokens)]
        new_tokens += block
        if context.length + len(block) > window:
            tokens = (tokens + block)[-(window // 2):]
            context = model.encode(torch.tensor([tokens], device=device))
        else:
            tokens += block
            context = model.encode(torch.tensor([block], device=device), cache=context)
    return new_tokens
