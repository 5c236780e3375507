"""Recurrent-depth language model with sequence recurrence (Huginn, Ouro; docs/method.md#looped-lm).

Design (the looped family with ``recurrence=sequence``, the default for bptt and ouro):
- prelude P: plain causal layers on the token embeddings, e = P(x);
- core R: ``n_core`` plain causal layers, shared by every loop. One loop updates the WHOLE
  latent sequence: s_k = norm(R(inject(s_{k-1}, e))), and inside R every position's state
  attends to every earlier position's state at the same loop. So each loop adds depth across
  positions (a position can combine what earlier positions computed one loop before): the
  wiring that lets a looped model track state over more steps with more loops. (The
  per-position wiring of loopdb.models.looped lets a state see the clean stream only.)
- Input injection: Huginn's adapter Linear([s ; e]) (``injection=concat``) or s + e;
  ``sandwich_norm``: Huginn's norm after every residual add, as well as before;
- coda C and head read the last state: logits = head(norm(C(s_K)));
- the state starts random (the sampler draws it, loopdb.sampling: Huginn's random initial state);
- ``exit_gate`` (Ouro): lambda = sigmoid(gate(s)) per position, the learned exit probability.
Generation keeps one KV cache per loop (memory grows with K; ``RecurrentCache.nbytes``), or with
``last_only`` Ouro's shortcut: a single cache holding each position's LAST loop, attended by
every loop of later tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..layers import Block, inject, RMSNorm, Rotary, causal_mask, init_linears, run_clean_layers
from ..maths.exit import ExitRule, ExitTracker


@dataclass
class RecurrentContext:
    """What the loops read for the positions of one call: the prelude output ``embedded`` (B, T, C);
    ``length``: positions so far, cached ones included; ``cache`` when decoding incrementally."""

    embedded: torch.Tensor
    length: int
    cache: "RecurrentCache | None" = None


@dataclass
class RecurrentCache:
    """Keys/values of earlier positions: prelude and coda per layer, core per loop and layer."""

    last_only: bool = False
    prelude_kv: list | None = None
    core_kv: list = field(default_factory=list)  # [loop][layer] -> (k, v); one loop with last_only
    coda_kv: list | None = None
    length: int = 0

    def nbytes(self) -> int:
        tensors = [t for kv in (self.prelude_kv or []) + (self.coda_kv or []) for t in kv]
        tensors += [t for loop in self.core_kv for kv in loop for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


class RecurrentDepthLM(nn.Module):
    sequence_recurrence = True  # every loop attends over all positions' states (loopdb.readouts.generation)
    draft_width, anchor_head = 1, False  # no drafts, no anchor head (loopdb.models.looped.NextTokenDenoiser)

    def __init__(self, model: ModelConfig, loop: str = "recurrent", exit_gate: bool = False):
        """``loop``: the sampler of one loop (loopdb.sampling), recurrent, or dense for the baseline."""
        super().__init__()
        self.config, self.loop = model, loop
        dim = model.d_model

        def blocks(count, sandwich=False):
            return nn.ModuleList(Block(dim, model.n_heads, model.mlp_ratio, False, model.attention, sandwich)
                                 for _ in range(count))

        self.embedding = nn.Embedding(model.vocab_size, dim)
        self.prelude = blocks(model.n_prelude)
        self.core = blocks(model.n_core, model.sandwich_norm)
        self.coda = blocks(model.n_coda)
        self.rotary = Rotary(dim // model.n_heads, model.context)
        self.injection = nn.Linear(2 * dim, dim, bias=False) if model.injection == "concat" else None
        self.core_norm = RMSNorm(dim)  # the state after each loop has unit RMS
        self.embedded_norm = RMSNorm(dim) if model.embedded_norm else None
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        self.exit_gate = nn.Linear(dim, 1) if exit_gate else None
        if model.init == "small":
            init_linears(self)
            nn.init.normal_(self.embedding.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the pieces the objectives use ---------------------------------------------------------
    def encode(self, tokens: torch.Tensor, cache: RecurrentCache | None = None) -> RecurrentContext:
        """The prelude over ``tokens`` (B, T), after the cached positions if ``cache`` is given."""
        start = 0 if cache is None else cache.length
        cos, sin, mask = self._positions(start, tokens.shape[1], tokens.device, cache is not None)
        embedded, prelude_kv = run_clean_layers(self.prelude, self.embedding(tokens), cos, sin,
                                                None if cache is None else cache.prelude_kv, mask=mask)
        if cache is not None:
            cache.prelude_kv = prelude_kv
        if self.embedded_norm is not None:
            embedded = self.embedded_norm(embedded)
        return RecurrentContext(embedded, start + tokens.shape[1], cache)

    def recur(self, state: torch.Tensor, context: RecurrentContext) -> torch.Tensor:
        """One loop over the whole sequence (no cache): state (B, T, C) -> next state (unit RMS)."""
        cos, sin, _ = self._positions(0, state.shape[1], state.device, False)
        hidden = self._inject(state, context.embedded)
        for layer in self.core:
            hidden, _ = layer(hidden, cos, sin)
        return self.core_norm(hidden)

    def readout(self, state: torch.Tensor, context: RecurrentContext) -> torch.Tensor:
        """Logits (B, T, V) from the last state through the coda (no cache)."""
        cos, sin, _ = self._positions(0, state.shape[1], state.device, False)
        hidden = state
        for layer in self.coda:
            hidden, _ = layer(hidden, cos, sin)
        return self._logits(hidden)

    def exit_probability(self, state: torch.Tensor) -> torch.Tensor:
        """Ouro's lambda = sigmoid(gate(s)), (B, T)."""
        if self.exit_gate is None:
            raise ValueError("this model has no exit gate (train with objective=ouro for gate:Q exits)")
        return torch.sigmoid(self.exit_gate(state.to(self.exit_gate.weight.dtype)).squeeze(-1).float())

    def dense_logits(self, context: RecurrentContext) -> torch.Tensor:
        """Dense baseline: every layer once, from a zero state: a plain causal transformer."""
        return self.readout(self.recur(torch.zeros_like(context.embedded), context), context)

    # -- incremental decoding ------------------------------------------------------------------------
    def new_cache(self, last_only: bool = False) -> RecurrentCache:
        return RecurrentCache(last_only=last_only)

    def decode(self, tokens: torch.Tensor, cache: RecurrentCache, state: torch.Tensor, num_loops: int,
               exit_rule: ExitRule | None = None):
        """Run ``tokens`` (B, T) after the cached positions: prelude, up to ``num_loops`` loops from
        ``state`` (B, T, C), coda. Returns (logits (B, T, V), loops used (B, T)) and extends the cache.

        A position that exits early keeps its state; for the loops it skips, its cache entries
        repeat its last loop's keys/values (Huginn's KV sharing), so later tokens still find one
        entry per position at every loop."""
        context = self.encode(tokens, cache)
        start = context.length - tokens.shape[1]
        cos, sin, mask = self._positions(start, tokens.shape[1], tokens.device, True)
        tracker = ExitTracker(exit_rule, state.shape[:2], state.device)
        produced = []  # per loop: per layer (k, v) of these positions
        for loop in range(num_loops):
            prefix = self._core_prefix(cache, loop)
            hidden, layer_kv = self._inject(state, context.embedded), []
            for index, layer in enumerate(self.core):
                hidden, kv = layer(hidden, cos, sin, kv_prefix=None if prefix is None else prefix[index], mask=mask)
                layer_kv.append(kv)
            new_state = self.core_norm(hidden)
            logits = self._coda_logits(new_state, cache, cos, sin, mask, commit=False) if tracker.needs_logits else None
            gate = self.exit_probability(new_state) if tracker.needs_gate else None
            active = tracker.active[..., None]
            state, old_state = torch.where(active, new_state, state), state
            if produced:  # an exited position repeats its last keys/values
                layer_kv = [tuple(torch.where(active[:, None], new, old) for new, old in zip(kv, prev))
                            for kv, prev in zip(layer_kv, produced[-1])]
            produced.append(layer_kv)
            tracker.update(old_state, state, logits, gate)
            if tracker.done and exit_rule is not None:
                break
        while len(produced) < num_loops:  # every position exited: repeat the last loop's entries
            produced.append(produced[-1])
        self._store_core(cache, produced)
        logits = self._coda_logits(state, cache, cos, sin, mask, commit=True)
        cache.length = context.length
        return logits, tracker.loops_used

    def _core_prefix(self, cache: RecurrentCache, loop: int):
        if not cache.core_kv:
            return None
        return cache.core_kv[0] if cache.last_only else cache.core_kv[loop]

    def _store_core(self, cache: RecurrentCache, produced: list) -> None:
        kept = produced[-1:] if cache.last_only else produced
        if not cache.core_kv:
            cache.core_kv = [list(loop) for loop in kept]
            return
        if len(cache.core_kv) != len(kept):
            raise ValueError(f"the cache holds {len(cache.core_kv)} loops; decode with the same loop count")
        cache.core_kv = [[(torch.cat([old[0], new[0]], 2), torch.cat([old[1], new[1]], 2))
                          for old, new in zip(old_loop, new_loop)] for old_loop, new_loop in zip(cache.core_kv, kept)]

    def _coda_logits(self, state, cache: RecurrentCache, cos, sin, mask, commit: bool):
        hidden, coda_kv = state, []
        for index, layer in enumerate(self.coda):
            prefix = None if cache.coda_kv is None else cache.coda_kv[index]
            hidden, (k, v) = layer(hidden, cos, sin, kv_prefix=prefix, mask=mask)
            coda_kv.append((k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)))
        if commit:
            cache.coda_kv = coda_kv
        return self._logits(hidden)

    # -- helpers -------------------------------------------------------------------------------------
    def _positions(self, start: int, length: int, device, with_prefix: bool):
        positions = torch.arange(start, start + length, device=device)
        cos, sin = self.rotary(positions)
        # without a prefix, None: the plain causal fast path
        mask = causal_mask(positions, torch.arange(start + length, device=device)) if with_prefix else None
        return cos, sin, mask

    def _inject(self, state, embedded):
        return inject(self.injection, state, embedded)

    def _logits(self, hidden):
        hidden = self.final_norm(hidden)
        return hidden @ self.embedding.weight.t() if self.head is None else self.head(hidden)
