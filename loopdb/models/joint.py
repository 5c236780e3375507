"""Sequence-joint DiffusionBlocks LM: the loop is a denoiser over the WHOLE sequence of states.

Design (the looped family with ``objective=diffusion`` and ``recurrence=sequence``; docs/method.md):
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
(loopdb.maths.schedules), chosen at inference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import DiffusionConfig, ModelConfig
from ..layers import Block, SigmaEmbedder, RMSNorm, Rotary
from ..maths.edm import NoiseSchedule, precondition
from .looped import NextTokenDenoiser
from .recurrent import RecurrentContext


class JointDiffusionLM(NextTokenDenoiser, nn.Module):
    sequence_recurrence = True  # every loop attends over all positions' states

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig):
        super().__init__()
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

    def encode(self, tokens: torch.Tensor) -> RecurrentContext:
        """The prelude over ``tokens`` (B, T): what every loop reads beside the states."""
        cos, sin = self._rotary(tokens.shape[1], tokens.device)
        hidden = self.embedding(tokens)
        for layer in self.prelude:
            hidden, _ = layer(hidden, cos, sin)
        return RecurrentContext(hidden, tokens.shape[1])

    def denoise(self, z: torch.Tensor, sigma, context: RecurrentContext) -> torch.Tensor:
        """Logits (B, T, V) of the denoiser for the states z (B, T, C) at noise levels ``sigma``: a
        float, one per sequence (B,), or one per position (B, T)."""
        batch, length = z.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
        sigma = (sigma[:, None] if sigma.dim() == 1 else sigma).expand(batch, length)
        pre = precondition(sigma, self.sigma_data)
        cos, sin = self._rotary(length, z.device)
        hidden = self._inject(pre.c_in[..., None] * z, context.embedded)
        cond = self.sigma_embedder(pre.c_noise).to(hidden.dtype)  # (B, T, C): one condition per row
        for layer in self.core:
            hidden, _ = layer(hidden, cos, sin, cond=cond)
        for layer in self.coda:
            hidden, _ = layer(hidden, cos, sin)
        return self.logits_from(hidden)

    def forward(self, inputs: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The training pass: prelude over ``inputs``, ONE denoiser evaluation of every position."""
        return self.denoise(noisy, sigma, self.encode(inputs))

    def _rotary(self, length: int, device):
        return self.rotary(torch.arange(length, device=device))

    def _inject(self, state, embedded):
        state = state.to(embedded.dtype)
        return self.injection(torch.cat([state, embedded], -1)) if self.injection is not None else state + embedded
