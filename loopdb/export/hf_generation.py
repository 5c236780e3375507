"""Generation streams of an exported loopdb model (`loopdb export` writes this file beside hf_modeling.py):
all rows at once with one cache (position recurrence, stacked), or row by row with a cache per loop
(sequence recurrence), as loopdb's generate_batch and generate do. Imports torch and transformers only."""

from __future__ import annotations

import torch

from .hf_layers import LoopDBCache

class _BatchStream:
    """Every row of ``generate`` at once (position recurrence, stacked): left-padded slots, one cache,
    and per row a generator for its initial states and token draws (loopdb's ``generate_batch``).
    A stream's ``hidden`` after each token: (B, 1, C) states of the newest position, its prelude output
    and then its state after each loop, as ``forward``'s ``hidden_states``."""

    def __init__(self, model, prompts, seed, num_loops, use_cache: bool, sampler):
        self.model, self.num_loops, self.use_cache, self.sampler = model, num_loops, use_cache, sampler
        self.generators = [torch.Generator().manual_seed(seed) for _ in prompts]
        self.device, window = model.embedding.weight.device, model.config.context
        prompts = [prompt[-window:] for prompt in prompts]
        longest = max(len(prompt) for prompt in prompts)
        self.pad = torch.tensor([longest - len(prompt) for prompt in prompts], device=self.device)
        self.slots = torch.tensor([[0] * (longest - len(prompt)) + prompt for prompt in prompts], device=self.device)
        self.cache, self.loops_used = None, [[] for _ in prompts]

    def next_tokens(self, temperature: float, top_k, done) -> list[int]:
        model, width = self.model, self.model.config.d_model
        if self.cache is None or not self.use_cache:
            self.cache = LoopDBCache(model.config, self.num_loops) if self.use_cache else None
            new = self.slots
        else:
            new = self.slots[:, -1:]
        clean = model._encode(new, self.pad if bool(self.pad.any()) else None, self.cache)
        if self.cache is not None:
            self.cache.length = self.slots.shape[1]
        z = None
        if model.config.objective != "dense":  # only the last position's noisy row decides the next token
            z = torch.cat([model._initial_state((1, 1, width), self.num_loops, generator, self.device)
                           for generator in self.generators])
        states = []
        logits = model._loop_logits(clean, z, self.num_loops, self.generators[0], states, self.sampler)[:, -1]
        self.hidden = (clean["embedded"][:, -1:], *(state[:, -1:] for state in states))
        tokens = [_choose(logits[row], temperature, top_k, generator) for row, generator in enumerate(self.generators)]
        for used, stop in zip(self.loops_used, done):
            if not stop:
                used.append(self.num_loops)
        self.slots = torch.cat([self.slots, torch.tensor(tokens, device=self.device)[:, None]], dim=1)
        window = model.config.context
        if self.slots.shape[1] > window:  # slide every row: keep the last half of the slots, rebuild the cache
            dropped = self.slots.shape[1] - window // 2
            self.slots, self.pad, self.cache = self.slots[:, dropped:], (self.pad - dropped).clamp_min(0), None
        return tokens


class _RowStreams:
    """The rows of ``generate`` one after another (sequence recurrence: per-loop caches, as loopdb's;
    sequence-joint: hf_joint.JointRow), each row a ``_RowStream`` or a ``JointRow``."""

    def __init__(self, rows):
        self.rows, self.hidden = rows, None

    @property
    def loops_used(self) -> list:
        return [row.loops_used for row in self.rows]

    def next_tokens(self, temperature: float, top_k, done) -> list[int]:
        tokens = []
        for row, stop in zip(self.rows, done):
            token = 0
            if not stop:
                token = _choose(row.next_logits(), temperature, top_k, row.generator)
                row.append(token)
            tokens.append(token)
        live = next(row.hidden for row, stop in zip(self.rows, done) if not stop)
        self.hidden = tuple(torch.cat([torch.zeros_like(state) if stop else row.hidden[index]
                                       for row, stop in zip(self.rows, done)]) for index, state in enumerate(live))
        return tokens


class _RowStream:
    """One row of a sequence-recurrent model: its window of tokens and its generator."""

    def __init__(self, model, prompt, seed, num_loops, use_cache: bool, exit_rule, last_only: bool = False):
        self.model, self.num_loops, self.seed, self.use_cache = model, num_loops, seed, use_cache
        self.exit_rule, self.last_only, self.loops_used, self.hidden = exit_rule, last_only, [], None
        self.generator = torch.Generator().manual_seed(seed)
        self.window = list(prompt[-model.config.context:])
        self.cache = None  # LoopDBCache of the window's positions but the last

    def next_logits(self) -> torch.Tensor:
        """Decode the positions not yet cached: the whole window after a slide (or every token without
        use_cache, against a fresh cache), else the last token; each position starts from its own
        seeded state, so a position starts the same however it is decoded."""
        model, device, width = self.model, self.model.embedding.weight.device, self.model.config.d_model
        if self.cache is None or not self.use_cache:
            self.cache, pending = LoopDBCache(model.config, self.num_loops, self.last_only), self.window
        else:
            pending = self.window[-1:]
        start = len(self.window) - len(pending)
        clean, states = model._encode(torch.tensor([pending], device=device), None, self.cache), []
        if model.config.objective == "dense":  # the layers once, from a zero state
            logits, used = model._decode_sequence(clean, torch.zeros_like(clean["embedded"]), 1, None, states)
        else:
            z = torch.stack([torch.randn(width, generator=torch.Generator().manual_seed(
                (self.seed * 1_000_003 + position) % 2**63)) for position in range(start, len(self.window))])[None]
            z = z * model.config.state_std
            logits, used = model._decode_sequence(clean, z.to(device), self.num_loops, self.exit_rule, states)
        self.hidden = (clean["embedded"][:, -1:], *(state[:, -1:] for state in states))
        self.cache.length = len(self.window)
        self.loops_used.append(int(used[0, -1]))
        return logits[0, -1]

    def append(self, token: int) -> None:
        self.window.append(token)
        context = self.model.config.context
        if len(self.window) > context:  # slide: keep the last half of the window, rebuild the cache
            self.window, self.cache = self.window[len(self.window) - context // 2:], None


def _choose(logits, temperature: float, top_k, generator) -> int:
    """The argmax at temperature 0, else a draw from the tempered (top-k) distribution."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator))


def _left_padding(attention_mask):
    """(B,) leading zeros of each row of the mask, or None without any."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    pad = (~mask).long().cumprod(dim=1).sum(dim=1)
    return pad if bool(pad.any()) else None
