"""Looped (recurrent-depth) language model whose loop is a diffusion denoiser.

Design (docs/method.md#looped-lm; [ours] where the paper is silent):
- prelude P: plain causal layers on the token embeddings, giving e = P(x);
- core R: ``n_core`` sigma-conditioned (adaLN-Zero) layers, shared by every loop;
- coda C: plain layers after the denoiser output, then the final norm and head.
- Per position t the loop state z_t is a noisy estimate of the NEXT token's
  unit-norm embedding y_t = normalize(E[x_{t+1}]); E is the input embedding table.
- Two streams [ours]: the CLEAN stream (e, through R with a learned "clean"
  conditioning and through C) is computed once per sequence and provides keys /
  values; the NOISY stream attends to clean keys at positions <= t and to itself,
  never to other noisy rows. Both share rotary positions. The clean keys/values do
  not depend on sigma or on the loop index, so generation keeps ONE cache per
  layer whatever the loop count.
- Denoiser (EDM preconditioning): D = c_skip*z + c_out*F with F = out(R(inject(c_in*z, e)));
  logits = head(C(D / target_scale)). The sampler's estimate of the clean target is
  Dhat = softmax(logits) @ normalize(E) -- the same table the training targets use.
- Likelihood logits (``likelihood_logits``) [ours]: each row's logits get
  log N(z; y_v, sigma^2 I) = <z, y_v> / sigma^2 + const added, the exact evidence its own
  noisy state gives about each token (Bayes: posterior = prior x likelihood). The network
  then only predicts the prior given the context and the other slots, and is sure of the
  token at small sigma from the start: a bare network reads z through c_skip but has to
  learn logits of scale 1/sigma^2 behind the final norm (the block ELBO exploded there).
- ``num_loops`` is an argument of every inference call; the sigma grid is computed
  from it on the fly (loopdb.maths.edm.sigma_grid), never stored.
- Draft width L (``draft_width``) [ours]: position t holds L noisy slots, the
  embeddings of tokens t+1..t+L, denoised jointly at one sigma. A slot attends to the
  clean keys at positions <= t and to the L slots of its own position, never to other
  positions' slots. Slot j has rotary position t+j and a learned slot embedding (zero at
  init; absent for L=1, which is exactly the one-next-token model above).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiffusionConfig, ModelConfig
from ..maths.edm import NoiseSchedule, precondition
from ..layers import (Block, inject, RMSNorm, Rotary, SigmaEmbedder, causal_mask, clean_context_mask, init_linears,
                      padded_causal_mask, padded_positions, run_clean_layers)


@dataclass
class CleanContext:
    """Clean-stream state the noisy stream attends to, for positions [0, length).

    prelude_kv / core_kv / coda_kv: per layer (k, v), each (B, H, length, hd).
    embedded: the prelude output e for the positions of the last encode call.
    pad: (B,) left-padding slots per row of a batch of prompts of unequal length, or None.
    """

    prelude_kv: list
    core_kv: list
    coda_kv: list
    embedded: torch.Tensor
    final_hidden: torch.Tensor
    length: int
    pad: torch.Tensor | None = None


class NextTokenDenoiser:
    """What every next-token diffusion LM of loopdb shares (the looped and the stacked one):
    the target table, Dhat, the head, and the noisy stream's positions and mask. Needs
    ``embedding``, ``rotary``, ``final_norm``, ``head`` and ``target_norm``."""

    draft_width = 1            # noisy slots per position (the looped model's draft_width)
    anchor_head = False        # whether the clean stream's next-token logits were trained (anchor_weight > 0)
    sequence_recurrence = False  # loops update one position's state at a time (loopdb.models.recurrent: all)

    # -- tables -----------------------------------------------------------------------
    def target_table(self) -> torch.Tensor:
        """Normalised embedding rows (norm ``target_norm``): the training targets AND the table of Dhat.
        Without gradients it is computed once per weight version: generation asks for it twice per loop,
        and normalising a (V, C) table cost more than the loop's layers on one row."""
        weight = self.embedding.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return self._normalised_table(weight)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self.__dict__.get("_table_key") != key:
            self.__dict__["_table"], self.__dict__["_table_key"] = self._normalised_table(weight.detach()), key
        return self.__dict__["_table"]

    def _normalised_table(self, weight: torch.Tensor) -> torch.Tensor:
        table = F.normalize(weight, dim=-1)
        return table if self.target_norm == 1.0 else table * self.target_norm

    def targets(self, next_tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(next_tokens, self.target_table())

    def soft_denoised(self, logits: torch.Tensor) -> torch.Tensor:
        """Dhat = softmax(logits) @ normalize(E) (docs/method.md#edm, discrete targets)."""
        table = self.target_table()
        return torch.softmax(logits.float(), dim=-1).to(table.dtype) @ table

    def logits_from(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norm(hidden)
        return hidden @ self.embedding.weight.t() if self.head is None else self.head(hidden)

    def _clean_positions(self, start: int, length: int, pad, device):
        """cos, sin and mask of a clean-stream call over slots [start, start + length); pad: (B,)
        left padding or None. mask None: the plain causal fast path (no cache, no padding)."""
        index = torch.arange(start, start + length, device=device)
        keys = torch.arange(start + length, device=device)
        if pad is not None:
            cos, sin = self.rotary(padded_positions(index, pad))
            return cos, sin, padded_causal_mask(index, keys, pad)
        cos, sin = self.rotary(index)
        return cos, sin, None if start == 0 else causal_mask(index, keys)

    def _noisy_positions(self, length: int, context, device):
        index = torch.arange(context.length - length, context.length, device=device)
        pad = getattr(context, "pad", None)
        cos, sin = self.rotary(index if pad is None else padded_positions(index, pad))
        mask = clean_context_mask(index, torch.arange(context.length, device=device), pad)
        return cos, sin, mask

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _init_linears_and_embedding(self):
        init_linears(self)
        nn.init.normal_(self.embedding.weight, std=0.02)


class LoopedLM(NextTokenDenoiser, nn.Module):
    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, loop: str = "diffusion",
                 anchor_head: bool = False):
        """``loop``: what one loop is at inference, the name of its sampler (loopdb.sampling): diffusion
        (a denoiser step), recurrent (``recur``) or dense (none: ``dense_logits``); ``anchor_head``: the
        dense next-token logits of the clean stream were trained beside the denoiser."""
        super().__init__()
        self.config, self.diffusion = model, diffusion
        self.loop, self.anchor_head = loop, anchor_head
        dim = model.d_model
        self.sigma_data = diffusion.sigma_data or dim**-0.5
        self.schedule = NoiseSchedule(diffusion.p_mean, diffusion.p_std, diffusion.sigma_min, diffusion.sigma_max)

        def blocks(count, conditioned):
            return nn.ModuleList(
                Block(dim, model.n_heads, model.mlp_ratio, conditioned, model.attention) for _ in range(count)
            )

        self.embedding = nn.Embedding(model.vocab_size, dim)
        self.prelude = blocks(model.n_prelude, False)
        self.core = blocks(model.n_core, True)
        self.coda = blocks(model.n_coda, False)
        # slot j of the last position sits at rotary position context - 1 + j
        self.rotary = Rotary(dim // model.n_heads, model.context + model.draft_width - 1)
        self.draft_width = model.draft_width
        self.slot_embedding = nn.Parameter(torch.zeros(model.draft_width, dim)) if model.draft_width > 1 else None
        self.sigma_embedder = SigmaEmbedder(dim)
        self.clean_condition = nn.Parameter(torch.zeros(dim))  # the core's conditioning for the clean stream
        self.injection = nn.Linear(2 * dim, dim, bias=False) if model.injection == "concat" else None
        self.target_norm = diffusion.target_norm or self.sigma_data * dim**0.5
        self.target_scale = self.target_norm / dim**0.5  # per-dimension scale of the targets
        # self-conditioning: the previous Dhat enters the core through a zero-initialised projection
        self.self_condition = nn.Linear(dim, dim, bias=False) if diffusion.self_condition else None
        self.core_norm = RMSNorm(dim)
        self.denoiser_out = nn.Linear(dim, dim, bias=False)  # F's output projection
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        self._init_linears_and_embedding()
        nn.init.zeros_(self.denoiser_out.weight)  # D starts as c_skip * z (EDM)
        if self.self_condition is not None:
            nn.init.zeros_(self.self_condition.weight)

    # -- clean stream -----------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, cache: CleanContext | None = None, pad=None) -> CleanContext:
        """Run the clean stream over ``tokens`` (B, T), appending to ``cache`` if given; ``pad``
        (B,): the rows are left-padded by that many slots (kept by the cache)."""
        start = 0 if cache is None else cache.length
        pad = pad if cache is None else cache.pad
        cos, sin, mask = self._clean_positions(start, tokens.shape[1], pad, tokens.device)

        def run(layers, hidden, past, cond=None):
            return run_clean_layers(layers, hidden, cos, sin, past, cond, mask)

        embedded, prelude_kv = run(self.prelude, self.embedding(tokens), None if cache is None else cache.prelude_kv)
        clean_cond = self.clean_condition.to(embedded.dtype).expand(tokens.shape[0], -1)
        hidden, core_kv = run(self.core, embedded, None if cache is None else cache.core_kv, clean_cond)
        final_hidden, coda_kv = run(self.coda, hidden, None if cache is None else cache.coda_kv)
        return CleanContext(prelude_kv, core_kv, coda_kv, embedded, final_hidden, start + tokens.shape[1], pad)

    # -- noisy stream ----------------------------------------------------------------------
    def _run_core(self, hidden, cond, context: CleanContext, cos, sin, mask):
        for layer, kv in zip(self.core, context.core_kv):
            hidden, _ = layer(hidden, cos, sin, cond=cond, kv_prefix=kv, mask=mask)
        return hidden

    def _run_coda(self, hidden, context: CleanContext, cos, sin, mask):
        for layer, kv in zip(self.coda, context.coda_kv):
            hidden, _ = layer(hidden, cos, sin, kv_prefix=kv, mask=mask)
        return self.logits_from(hidden)

    def _inject(self, state, embedded):
        return inject(self.injection, state, embedded)

    def denoise(self, z: torch.Tensor, sigma, context: CleanContext, previous: torch.Tensor | None = None):
        """DiffusionBlocks: logits of the denoiser at noise level sigma for the LAST
        z.shape[1] positions of context. z: (B, Tq, C) noisy next-token embeddings;
        sigma: float or (B,) tensor; previous: the last Dhat, with self-conditioning (None = zeros)."""
        length = z.shape[1]
        anchors = torch.arange(context.length - length, context.length, device=z.device)
        return self._denoise_rows(z, sigma, context, anchors, torch.zeros_like(anchors), previous)

    def denoise_draft(self, z: torch.Tensor, sigma, context: CleanContext, positions: torch.Tensor | None = None):
        """The draft denoiser: z (B, P, L, C), the L noisy slots of each of P positions (default: the
        last P of context; else ``positions``, absolute, among the last encode call's), denoised
        jointly at sigma. Returns logits (B, P, L, V): slot j of position t predicts token t+1+j."""
        batch, count, width = z.shape[0], z.shape[1], z.shape[2]
        if width != self.draft_width:
            raise ValueError(f"z has {width} slots per position; this model drafts {self.draft_width}")
        if positions is None:
            positions = torch.arange(context.length - count, context.length, device=z.device)
        anchors = positions.repeat_interleave(width)  # rows ordered (position, slot)
        slots = torch.arange(width, device=z.device).repeat(count)
        logits = self._denoise_rows(z.reshape(batch, count * width, -1), sigma, context, anchors, slots)
        return logits.view(batch, count, width, -1)

    def _denoise_rows(self, z, sigma, context: CleanContext, anchors, slots, previous=None):
        """D and logits for noisy rows z (B, R, C); row r belongs to clean position anchors[r]
        (absolute) as slot slots[r]. It sees clean keys <= its position and the rows of its own
        position (docs/method.md#looped-lm; for one slot per position: itself)."""
        batch = z.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(batch)
        pre = precondition(sigma, self.sigma_data)
        keys, own_position = torch.arange(context.length, device=z.device), anchors[:, None] == anchors[None, :]
        pad = getattr(context, "pad", None)
        if pad is None:
            cos, sin = self.rotary(anchors + slots)
            mask = torch.cat([causal_mask(anchors, keys), own_position], dim=1)
        else:  # left-padded rows (batched generation): row positions start at its first real token
            cos, sin = self.rotary(padded_positions(anchors, pad) + slots)
            mask = torch.cat([padded_causal_mask(anchors, keys, pad), own_position.expand(len(pad), 1, -1, -1)], dim=-1)
        embedded = context.embedded[:, anchors - (context.length - context.embedded.shape[1])]
        hidden = self._inject(pre.c_in[:, None, None] * z, embedded)
        if self.slot_embedding is not None:
            hidden = hidden + self.slot_embedding[slots].to(hidden.dtype)
        if self.self_condition is not None and previous is not None:
            hidden = hidden + self.self_condition((previous / self.target_scale).to(hidden.dtype))
        hidden = self._run_core(hidden, self.sigma_embedder(pre.c_noise), context, cos, sin, mask)
        denoised = pre.denoised(z, self.denoiser_out(self.core_norm(hidden)))
        logits = self._run_coda(denoised / self.target_scale, context, cos, sin, mask)  # the coda sees unit scale
        if not self.diffusion.likelihood_logits:
            return logits
        # float32: at small sigma the evidence reaches 1e5 nats; the table is detached because a
        # 1/sigma^2 gradient into the embeddings would swamp every other one
        evidence = z.float() @ self.target_table().detach().float().t() / sigma.float()[:, None, None] ** 2
        return logits.float() + evidence

    def recur(self, state: torch.Tensor, context: CleanContext) -> torch.Tensor:
        """BPTT (Huginn): one plain iteration of the core, state -> next state (unit RMS).

        The recurrent rows use the same layout as the noisy stream and the core's
        clean conditioning, so every objective shares one model and one cache."""
        length = state.shape[1]
        cos, sin, mask = self._noisy_positions(length, context, state.device)
        hidden = self._inject(state, context.embedded[:, -length:])
        cond = self.clean_condition.to(hidden.dtype).expand(state.shape[0], -1)
        return self.core_norm(self._run_core(hidden, cond, context, cos, sin, mask))

    def readout(self, state: torch.Tensor, context: CleanContext) -> torch.Tensor:
        """BPTT: logits from the recurrent state through the coda."""
        cos, sin, mask = self._noisy_positions(state.shape[1], context, state.device)
        return self._run_coda(state, context, cos, sin, mask)

    def dense_logits(self, context: CleanContext) -> torch.Tensor:
        """Dense: the same layers applied once to the clean stream, as a plain causal LM."""
        return self.logits_from(context.final_hidden)

    def forward(self, inputs: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, previous=None) -> torch.Tensor:
        """DiffusionBlocks training pass: clean stream over ``inputs``, one denoiser evaluation everywhere."""
        return self.denoise(noisy, sigma, self.encode(inputs), previous)
