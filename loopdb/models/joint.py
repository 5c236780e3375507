"""Sequence-joint DiffusionBlocks LM: the loop is a denoiser over the WHOLE sequence of states.

Design (the looped family with ``objective=diffusion`` and ``recurrence=sequence``; docs/method.md 3.1.6):
- prelude P: plain causal layers on the token embeddings, e = P(x) (as in Huginn's wiring);
- the loop state z_t at position t is a noisy copy of t's own target, the unit-norm embedding of
  the token t must predict: z = y + sigma_t * eps. Positions may sit at DIFFERENT noise levels
  (``sigma`` is per row), which is what lets a sampler resolve early positions first;
- core R: ``n_core`` adaLN-Zero layers conditioned per row on c_noise(sigma_t), run with causal
  attention over all positions' states: position t reads the noisy states of positions <= t, so
  what an earlier position has resolved flows forward, one loop at a time, as in BPTT's
  sequence recurrence, but trained in ONE forward/backward pass at a sampled sigma;
- input injection: Huginn's adapter Linear([c_in z ; e]) (``injection=concat``) or c_in z + e;
- coda C and the head give logits; Dhat = softmax(logits) @ the target table drives the sampler.
The network sees no loop index and no grid: K loops = K sampler steps on any grid
(loopdb.maths.schedules), chosen at inference. docs/method.md#position-schedules

A known prefix (text: every position but the newest has a known target, the token after it):
those positions enter as their clean targets at the grid's last sigma, the state the sampler ends
in. Their keys/values then never change, so a ``JointContext`` keeps ONE cache per layer whatever
the loop count; each new token in generation, and each scored position, runs its K loops as one
row against the prefix before it.

A reasoning task's prompt (``prompt_openers``: the positions before the first word that opens the
task's answers) asks no answer, so its targets are a placeholder. With ``clean_prompt`` those
positions sit at the last sigma: drawn there in training (y + sigma_last * eps, by the objective),
and at inference held at the placeholder's clean target in every denoiser call, as a text LM's
known prefix is. docs/method.md#clean-prompt
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import DiffusionConfig, ModelConfig
from ..layers import Block, inject, SigmaEmbedder, RMSNorm, Rotary, causal_mask, run_clean_layers
from ..maths.edm import NoiseSchedule, precondition
from .looped import NextTokenDenoiser


@dataclass
class JointContext:
    """What the loops read: ``embedded``, the prelude output (B, length, C) of every position so far.
    With a known prefix the first ``committed`` positions sit at their clean targets at the last
    sigma and their per-layer keys/values are cached (prelude_kv over all positions, core_kv and
    coda_kv over the committed ones)."""

    embedded: torch.Tensor
    length: int
    prelude_kv: list | None = None
    core_kv: list | None = None
    coda_kv: list | None = None
    committed: int = 0
    prompt: torch.Tensor | None = None  # (B, length) bool: the positions held at their clean placeholder


class JointDiffusionLM(NextTokenDenoiser, nn.Module):
    loop = "joint"  # its sampler (loopdb.sampling): K steps with a sigma per position
    anchor_head = False

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, targets_are_next_tokens: bool = True,
                 prompt_openers: list[int] | None = None):
        """``targets_are_next_tokens``: a text LM (position t's target is token t+1, so at inference
        every position but the newest has a known target); False for a reasoning task's answers.
        ``prompt_openers``: token ids that end a task's prompt, whose positions are then held clean."""
        super().__init__()
        self.targets_are_next_tokens = targets_are_next_tokens
        opener = None
        if prompt_openers is not None:
            opener = torch.zeros(model.vocab_size, dtype=torch.bool)
            opener[list(prompt_openers)] = True
        self.register_buffer("opener", opener, persistent=False)
        self.config, self.diffusion = model, diffusion
        dim = model.d_model
        self.sigma_data = diffusion.sigma_data or dim**-0.5
        self.schedule = NoiseSchedule(diffusion.p_mean, diffusion.p_std, diffusion.sigma_min, diffusion.sigma_max)

        def blocks(count, conditioned):
            return nn.ModuleList(Block(dim, model.n_heads, model.mlp_ratio, conditioned, model.attention)
                                 for _ in range(count))

        self.embedding = nn.Embedding(model.vocab_size, dim)
        self.prelude = blocks(model.n_prelude, False)
        self.core = blocks(model.n_core, True)
        self.coda = blocks(model.n_coda, False)
        self.rotary = Rotary(dim // model.n_heads, model.context)
        self.sigma_embedder = SigmaEmbedder(dim)
        self.injection = nn.Linear(2 * dim, dim, bias=False) if model.injection == "concat" else None
        self.target_norm = diffusion.target_norm or self.sigma_data * dim**0.5
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        self._init_linears_and_embedding()

    def encode(self, tokens: torch.Tensor, cache: JointContext | None = None, known: bool | None = None) -> JointContext:
        """The context of ``tokens`` (B, T) at inference, appended to ``cache`` if given.

        ``known`` (default: ``targets_are_next_tokens``): every position but the newest has a known
        target, the token after it; those enter as clean targets at the last sigma and are cached,
        and a sampler denoises each row against that prefix alone (text: scoring and generation).
        Without it (a reasoning task, whose running answers are not in the input) every position
        is denoised jointly."""
        known = self.targets_are_next_tokens if known is None else known
        if cache is None and not known:
            return self._joint_context(tokens)
        start = 0 if cache is None else cache.length
        cos, sin, mask = self._positions(start, tokens.shape[1], start, False, tokens.device)
        embedded, prelude_kv = run_clean_layers(self.prelude, self.embedding(tokens), cos, sin,
                                                None if cache is None else cache.prelude_kv, mask=mask)
        if cache is not None:
            embedded = torch.cat([cache.embedded, embedded], 1)
        context = JointContext(embedded, start + tokens.shape[1], prelude_kv, None if cache is None else cache.core_kv,
                               None if cache is None else cache.coda_kv, 0 if cache is None else cache.committed)
        return self._commit(context, tokens if cache is not None else tokens[:, 1:])

    def prompt_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool: a task's prompt, the positions before the first answer-opening token; None
        without ``prompt_openers``."""
        return None if self.opener is None else self.opener[tokens].cumsum(1) == 0

    def _joint_context(self, tokens: torch.Tensor, hold_prompt: bool = True) -> JointContext:
        """Every position denoised jointly; at inference the prompt held at its clean placeholder."""
        cos, sin, _ = self._positions(0, tokens.shape[1], 0, False, tokens.device)
        embedded = run_clean_layers(self.prelude, self.embedding(tokens), cos, sin)[0]
        return JointContext(embedded, tokens.shape[1], prompt=self.prompt_mask(tokens) if hold_prompt else None)

    def _commit(self, context: JointContext, targets: torch.Tensor) -> JointContext:
        """Cache the next targets.shape[1] positions after the committed ones at their clean targets."""
        count = targets.shape[1]
        if count == 0:
            return context
        start = context.committed
        sigma = torch.full(targets.shape, self.sigma_last, device=targets.device)
        cos, sin, mask = self._positions(start, count, start, False, targets.device)
        pre = precondition(sigma, self.sigma_data)
        hidden = self._inject(self._state_input(self.targets(targets), pre), context.embedded[:, start:start + count])
        cond = self.sigma_embedder(pre.c_noise).to(hidden.dtype)
        hidden, core_kv = run_clean_layers(self.core, hidden, cos, sin, context.core_kv, cond, mask)
        _, coda_kv = run_clean_layers(self.coda, hidden, cos, sin, context.coda_kv, None, mask)
        return JointContext(context.embedded, context.length, context.prelude_kv, core_kv, coda_kv, start + count)

    @property
    def sigma_last(self) -> float:
        """Where the sampler ends, and where known positions sit."""
        return self.diffusion.grid_sigma_last or self.schedule.sigma_min

    def denoise(self, z: torch.Tensor, sigma, context: JointContext) -> torch.Tensor:
        """Logits (B, n, V) of the denoiser for the states z (B, n, C) of the context's last n
        positions, at noise levels ``sigma``: a float, one per sequence (B,), or one per position (B, n).
        Rows read each other causally; with a known prefix, each row reads the prefix before it
        and itself only."""
        batch, length = z.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
        sigma = (sigma[:, None] if sigma.dim() == 1 else sigma).expand(batch, length)
        start = context.length - length
        if context.prompt is not None:
            held = context.prompt[:, start:, None]
            z = torch.where(held, self.target_table()[0].to(z.dtype), z)  # token 0: the objective's placeholder
            sigma = torch.where(held[..., 0], self.sigma_last, sigma)
        pre = precondition(sigma, self.sigma_data)
        cos, sin, mask = self._positions(start, length, context.committed, context.committed > 0, z.device)
        hidden = self._inject(self._state_input(z, pre), context.embedded[:, start:])
        cond = self.sigma_embedder(pre.c_noise).to(hidden.dtype)  # (B, n, C): one condition per row
        return self._core_and_coda(hidden, cond, cos, sin, mask, context.core_kv, context.coda_kv)

    def _core_and_coda(self, hidden, cond, cos, sin, mask, core_kv=None, coda_kv=None) -> torch.Tensor:
        """Logits of the core (conditioned per row) and the coda over ``hidden``, after cached prefixes."""
        for index, layer in enumerate(self.core):
            hidden, _ = layer(hidden, cos, sin, cond=cond, mask=mask,
                              kv_prefix=None if core_kv is None else core_kv[index])
        for index, layer in enumerate(self.coda):
            hidden, _ = layer(hidden, cos, sin, mask=mask, kv_prefix=None if coda_kv is None else coda_kv[index])
        return self.logits_from(hidden)

    def forward(self, inputs: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                clean_targets: torch.Tensor | None = None) -> torch.Tensor:
        """The training pass: prelude over ``inputs``, ONE denoiser evaluation of every position. The
        objective draws a held prompt at the last sigma like any state (loopdb.objectives.joint).
        With ``clean_targets`` every row reads the earlier positions at those clean targets instead of
        their noisy states (teacher forcing, ``_denoise_after_clean``)."""
        context = self._joint_context(inputs, hold_prompt=False)
        if clean_targets is None:
            return self.denoise(noisy, sigma, context)
        return self._denoise_after_clean(noisy, sigma, context, clean_targets)

    def _denoise_after_clean(self, z: torch.Tensor, sigma: torch.Tensor, context: JointContext,
                             clean_targets: torch.Tensor) -> torch.Tensor:
        """Logits of the noisy states z (B, T, C) when every earlier position is resolved, in one pass of
        2T rows: rows [0, T) hold each position's clean target at the last sigma and read each other
        causally (the committed prefix of inference); rows [T, 2T) hold the noisy states and each reads
        the clean rows before its position and itself, the layout the sampler meets once every earlier
        answer is resolved (the step accuracy's layout, trained on every position at once)."""
        batch, length = z.shape[:2]
        sigma = sigma.expand(batch, length)
        states = torch.cat([self.targets(clean_targets).to(z.dtype), z], 1)
        pre = precondition(torch.cat([torch.full_like(sigma, self.sigma_last), sigma], 1), self.sigma_data)
        hidden = self._inject(self._state_input(states, pre), context.embedded.repeat(1, 2, 1))
        cond = self.sigma_embedder(pre.c_noise).to(hidden.dtype)
        position = torch.arange(length, device=z.device)
        cos, sin = self.rotary(position.repeat(2))  # a clean row and its noisy row share their position
        _, _, after_clean = self._positions(0, length, length, True, z.device)  # clean keys before, own row
        among_clean = torch.cat([causal_mask(position, position), torch.zeros_like(after_clean[:, length:])], 1)
        logits = self._core_and_coda(hidden, cond, cos, sin, torch.cat([among_clean, after_clean], 0))
        return logits[:, length:]

    def _rotary(self, length: int, device):
        return self.rotary(torch.arange(length, device=device))

    def _positions(self, start: int, length: int, cached: int, alone: bool, device):
        """cos, sin and mask of rows [start, start + length) reading ``cached`` cached keys (those before
        each row's position) and their own rows: causally, or with ``alone`` each row itself only.
        mask None (no cache): the plain causal fast path."""
        queries = torch.arange(start, start + length, device=device)
        cos, sin = self.rotary(queries)
        if cached == 0 and start == 0:
            return cos, sin, None
        prefix = torch.arange(cached, device=device)
        own = queries[None, :] == queries[:, None] if alone else causal_mask(queries, queries)
        return cos, sin, torch.cat([prefix[None, :] < queries[:, None], own], dim=1)

    def _state_input(self, z, pre):
        """What the core reads of states z: EDM's c_in z (unit variance at every sigma), or with
        ``state_input=wiener`` the linear posterior mean c_skip z scaled by 1 / sigma_data, the same at
        low sigma and near zero where z is mostly noise, so noisy rows add little noise to the residual."""
        scale = pre.c_skip / self.sigma_data if self.diffusion.state_input == "wiener" else pre.c_in
        return scale[..., None] * z

    def _inject(self, state, embedded):
        return inject(self.injection, state, embedded)
