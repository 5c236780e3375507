"""Masked diffusion language model (MD4) trained with DiffusionBlocks (docs/method.md#masked-diffusion).

Design choices ([ours] where docs/method.md and the paper are silent):
- Absorbing-state diffusion: a masked token becomes [MASK], id ``vocab_size`` (one extra
  embedding row; the head predicts only the real vocabulary). Linear schedule
  alpha(t) = 1 - t: at time t each position is masked independently with probability t.
- Loss (MD4): -alpha'(t) / (1 - alpha(t)) = 1/t times the sum of the cross-entropy over
  masked positions, per sequence, divided by the sequence length [ours] so it reads in
  nats per token; its expectation over t ~ U(0, 1] is the ELBO per token.
- Network: a bidirectional transformer (no attention mask) of ``n_layers`` adaLN-Zero
  blocks (``layers.Block(conditioned=True)``) conditioned on t through ``SigmaEmbedder``
  fed t itself (its sinusoid scales the input by 1000: DiT's timestep convention);
  shared token embedding, final RMSNorm and head (tied to the embedding's real-token rows
  by default, ``tie_head``).
- DiffusionBlocks: the n_layers form ``num_blocks`` contiguous blocks. Equal alpha
  decrements per block: with the linear schedule t_b = b/B. Block 0 (the input side,
  first to run when sampling) owns the most-masked range (1 - 1/B, 1]; block b owns
  (t_{B-1-b}, t_{B-b}], a boundary going to the block of the lower range. Boundaries come
  from num_blocks on every call, never stored.
- Training (objective=diffusion): one block per step, uniformly (the whole batch uses it);
  t stratified over the batch inside its range widened by ``block_overlap`` x its width
  on each side, clipped to [0, 1] (loopdb.maths.partition, with t in place of
  log sigma). The block reads the masked token embedding itself, never another block's
  output, and only its layers run, so only its parameters (and the shared ones) get
  gradients. objective=dense: every layer stacked, t stratified over (0, 1].
- ELBO: -log p(x) <= int_0^1 (1/t) E[sum over masked CE] dt, each t scored by the block
  that owns it. Estimated with a FIXED number of draws per window (``ELBO_T_SAMPLES`` =
  16, seeded): draw k takes m in {1..L} masked positions, stratified (m = 1 + floor(u_k L),
  u_k = (k + v)/K), a uniformly random set of them and t ~ Beta(m, L - m + 1) (the m-th
  smallest of L uniforms; t is uniform on (0, 1] overall); the estimate (L/m) * sum over
  masked CE is unbiased for the bound (integrate t out per mask size) and equals exactly
  L log V for a model that predicts uniformly. Bits per byte = nats / ln 2 / bytes.
- Sampler (MD4, ancestral): from an all-mask sequence (after an optional fixed prompt),
  T steps on t_i = 1 - i/T; from t to s each still-masked position is unmasked with
  probability (t - s)/t, its token drawn from the model at t (the block that owns t).
  Unmasked tokens never change; the last step (s = 0) unmasks every position.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import DiffusionConfig, ModelConfig
from ..layers import Block, RMSNorm, Rotary, SigmaEmbedder, init_weights
from ..maths.partition import time_partition


# -- schedule ----------------------------------------------------------------------------------------
def alpha(t):
    """Linear schedule: the probability that a token is still unmasked at time t."""
    return 1.0 - t


# -- the network -----------------------------------------------------------------------------------
class MaskedDiffusionLM(nn.Module):
    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, blockwise: bool = True):
        """``blockwise``: each time t is run by the block that owns it (DiffusionBlocks); False: by
        every layer (the dense baseline)."""
        super().__init__()
        self.config, self.diffusion = model, diffusion
        self.blockwise = blockwise
        self.vocab_size, self.mask_id = model.vocab_size, model.vocab_size
        self.num_blocks, self.layers_per_block = model.num_blocks, model.n_layers // model.num_blocks
        dim = model.d_model
        self.embedding = nn.Embedding(model.vocab_size + 1, dim)  # the last row is [MASK]
        self.layers = nn.ModuleList(Block(dim, model.n_heads, model.mlp_ratio, conditioned=True,
                                          backend=model.attention) for _ in range(model.n_layers))
        self.rotary = Rotary(dim // model.n_heads, model.context)
        self.time_embedder = SigmaEmbedder(dim)
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        init_weights(self)

    @property
    def partition(self):
        """Equal alpha decrements per block (t_b = b/B), widened by ``block_overlap`` for training;
        from num_blocks on every call, never stored."""
        return time_partition(self.num_blocks, self.diffusion.block_overlap)

    def block_layers(self, block_index: int | None):
        """The contiguous layers of one block (block 0 first), or every layer for None (dense)."""
        if block_index is None:
            return self.layers
        start = block_index * self.layers_per_block
        return self.layers[start:start + self.layers_per_block]

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, block_index: int | None = None) -> torch.Tensor:
        """tokens: (B, L) with [MASK] ids; t: (B,). Logits (B, L, V) over the real vocabulary from the
        masked token embedding through ONE block's layers (or all of them for block_index None)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rotary(positions)
        cond = self.time_embedder(t)  # (B, C)
        hidden = self.embedding(tokens)  # (B, L, C)
        for layer in self.block_layers(block_index):
            hidden, _ = layer(hidden, cos, sin, cond=cond, causal=False)
        hidden = self.final_norm(hidden)
        if self.head is None:
            return hidden @ self.embedding.weight[:self.vocab_size].t()
        return self.head(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
