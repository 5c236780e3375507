"""Stacked (untied) language model in B DiffusionBlocks (docs/method.md#stacked-lm).

Design choices ([ours] where the paper is silent; each is a config key or documented here):
- ``n_layers`` distinct sigma-conditioned (adaLN-Zero) layers in ``num_blocks`` contiguous
  blocks. Shared by all blocks: the token embedding (also the target table), the sigma
  embedder, the final norm and the (tied by default) head. Each block owns its layers, a
  learned "clean" conditioning, its input projection (``injection``) and its denoiser output.
- Layout [ours]: the NEXT-token form of the looped model (docs/method.md#looped-lm), not the
  "noisy t sees clean < t" form: the noisy row t is a noisy estimate of
  normalize(E[x_{t+1}]) and attends to clean keys at positions <= t and to itself only
  (``layers.clean_context_mask``, the looped model's mask; no row is ever fully masked).
  Both streams share rotary positions. The engine, scoring and generation are unchanged.
- DiffusionBlocks proper: block b is a whole denoiser on its own. Its clean stream
  starts from the token embedding e = E[x] and runs through block b's layers only; its
  noisy stream starts from inject(c_in * z, e), NEVER from another block's output
  (docs/method.md#pitfall-4). Training a block runs only that block's layers.
- Block b (b = 0 nearest the input) owns the b-th HIGHEST noise range of the
  ``partition`` (equi-probability by default); training sigmas come from that range
  widened by ``block_overlap`` (0.1 for text, docs/method.md#edm). At inference each sampler step
  uses the block owning its sigma (no overlap): with T = B equi-probability steps each
  block runs once.
- EDM preconditioning as in the looped model: D = c_skip*z + c_out*out_b(norm_b(h));
  logits = head(final_norm(D / target_scale)); Dhat = softmax(logits) @ normalize(E).
- Cache: one per block of per-layer clean keys/values (they depend on neither sigma nor
  the step), so generation keeps L layers of cache whatever T is.
- ``chained`` (the dense baseline, objective=dense) chains the SAME layers end to end on the
  clean stream (block 0's output feeds block 1, ...) with each block's clean conditioning, and
  trains with next-token CE; its logits come from the last layer.
- ``checkpointing``: activation checkpointing of each layer while training (both
  objectives), for the memory benchmark's baselines.
- Memory: a process builds only the blocks it holds (``held_blocks``; the others live on
  the meta device), each block initialised from its own seed so that does not change its
  weights; blocks a run does not train are frozen (no optimizer state). On a GPU,
  ``HostOffload`` keeps the blocks not in use, and their AdamW state, in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import DiffusionConfig, ModelConfig
from ..maths.edm import NoiseSchedule, precondition
from ..maths.partition import sigma_partition
from ..layers import Block, RMSNorm, Rotary, SigmaEmbedder, run_clean_layers
from ..layers import init_linears
from .looped import NextTokenDenoiser


@dataclass
class StackedContext:
    """Clean-stream state for positions [0, length).

    block_kv[b]: per layer of block b its (k, v), each (B, H, length, hd); None for a block not encoded.
    embedded: the token embeddings e of the last encode call's positions.
    final_hidden: the chained (dense) stream's last hidden state, or None.
    """

    block_kv: list
    embedded: torch.Tensor
    final_hidden: torch.Tensor | None
    length: int
    pad: torch.Tensor | None = None  # (B,) left padding per row, or None (loopdb.models.looped.CleanContext)


class DiffusionBlock(nn.Module):
    """One block: its layers, clean conditioning, input projection and denoiser output."""

    def __init__(self, model: ModelConfig, num_layers: int):
        super().__init__()
        dim = model.d_model
        self.layers = nn.ModuleList(
            Block(dim, model.n_heads, model.mlp_ratio, True, model.attention) for _ in range(num_layers)
        )
        self.clean_condition = nn.Parameter(torch.zeros(dim))
        self.injection = nn.Linear(2 * dim, dim, bias=False) if model.injection == "concat" else None
        self.norm = RMSNorm(dim)
        self.denoiser_out = nn.Linear(dim, dim, bias=False)

    @property
    def held(self) -> bool:
        """False for a block this process does not hold (its tensors are on the meta device)."""
        return not self.clean_condition.is_meta

    def _apply(self, fn, *args, **kwargs):
        return super()._apply(fn, *args, **kwargs) if self.held else self  # .to(device) leaves a released block alone

    def inject(self, state, embedded):
        state = state.to(embedded.dtype)
        return self.injection(torch.cat([state, embedded], -1)) if self.injection is not None else state + embedded


class StackedLM(NextTokenDenoiser, nn.Module):
    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, chained: bool = False,
                 checkpointing: bool = False, held_blocks=None):
        """``chained``: the dense baseline's wiring (module docstring); ``held_blocks``: the blocks whose
        weights this process holds (default all); the others stay on the meta device and take no
        memory (a process that trains one block)."""
        super().__init__()
        self.config, self.diffusion = model, diffusion
        self.chained = chained
        self.checkpointing = checkpointing
        self.offload = None  # a HostOffload on GPU: only the block in use on the device
        dim = model.d_model
        self.sigma_data = diffusion.sigma_data or dim**-0.5
        self.schedule = NoiseSchedule(diffusion.p_mean, diffusion.p_std, diffusion.sigma_min, diffusion.sigma_max)
        # from the config, never stored
        self.partition = sigma_partition(self.schedule, model.num_blocks, diffusion.partition, diffusion.block_overlap)
        self.target_norm = diffusion.target_norm or self.sigma_data * dim**0.5
        self.target_scale = self.target_norm / dim**0.5
        # shared parameters
        self.embedding = nn.Embedding(model.vocab_size, dim)
        self.rotary = Rotary(dim // model.n_heads, model.context)
        self.sigma_embedder = SigmaEmbedder(dim)
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        # the blocks
        per_block = model.n_layers // model.num_blocks
        held = set(range(model.num_blocks)) if held_blocks is None else set(held_blocks)
        # shared parameters from the global RNG; each block from its own generator seeded from it,
        # so a block's initial weights do not depend on which other blocks a process holds
        block_seed = int(torch.randint(2**62, (1,)))
        self.blocks = nn.ModuleList()
        with torch.random.fork_rng(devices=[]):  # building a block (on CPU or meta) leaves the global RNG alone
            for index in range(model.num_blocks):
                with torch.device("cpu" if index in held else "meta"):
                    self.blocks.append(DiffusionBlock(model, per_block))
        init_linears(self.sigma_embedder)
        if self.head is not None:
            init_linears(self.head)
        nn.init.normal_(self.embedding.weight, std=0.02)
        for index in sorted(held):
            self.init_block(index, block_seed)

    def init_block(self, block_index: int, block_seed: int) -> None:
        block = self.blocks[block_index]
        init_linears(block, torch.Generator().manual_seed(block_seed + block_index))
        nn.init.zeros_(block.denoiser_out.weight)  # D starts as c_skip * z (EDM)

    def materialize_block(self, block_index: int, device) -> DiffusionBlock:
        """Allocate a block this process did not hold (its weights are then loaded, e.g. gathered
        from the rank that trained it)."""
        if not self.blocks[block_index].held:
            self.blocks[block_index] = DiffusionBlock(self.config, self.config.n_layers // self.config.num_blocks).to(device)
        return self.blocks[block_index]

    # -- which parameters belong to which block -------------------------------------------
    def block_parameters(self, block_index: int) -> list[nn.Parameter]:
        return list(self.blocks[block_index].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        in_blocks = {id(p) for p in self.blocks.parameters()}
        return [p for p in self.parameters() if id(p) not in in_blocks]

    def block_range(self, block_index: int) -> tuple[float, float]:
        """Training noise range of a block (its partition range widened by the overlap)."""
        return self.partition.training_range(block_index)

    def block_for_sigma(self, sigma: float) -> int:
        return self.partition.owner(sigma)

    def _use_block(self, block_index: int) -> DiffusionBlock:
        if self.offload is not None:
            self.offload.activate(block_index)
        return self.blocks[block_index]

    @property
    def loop(self) -> str:
        """The sampler of one loop (loopdb.sampling): a denoiser step, or none for the chained stack."""
        return "dense" if self.chained else "diffusion"

    def _layer_call(self, layer, hidden, cos, sin, cond, kv_prefix, mask):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, cos, sin, cond, kv_prefix, mask, use_reentrant=False)
        return layer(hidden, cos, sin, cond=cond, kv_prefix=kv_prefix, mask=mask)

    # -- clean stream -------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, cache: StackedContext | None = None,
               blocks: list[int] | None = None, pad=None) -> StackedContext:
        """Clean stream over ``tokens`` (B, T), appending to ``cache``; ``blocks``: only these
        blocks' streams (training runs one block; default all). Dense: the chained stream."""
        start = 0 if cache is None else cache.length
        length = tokens.shape[1]
        pad = pad if cache is None else cache.pad
        cos, sin, mask = self._clean_positions(start, length, pad, tokens.device)
        embedded = self.embedding(tokens)  # (B, T, C)
        wanted = range(len(self.blocks)) if blocks is None else blocks
        block_kv = [None] * len(self.blocks)
        hidden = embedded
        for index in wanted:
            block = self._use_block(index)
            cond = block.clean_condition.to(embedded.dtype).expand(tokens.shape[0], -1)
            past = None if cache is None else cache.block_kv[index]
            source = hidden if self.chained else embedded  # DiffusionBlocks: every block starts from e
            hidden, block_kv[index] = run_clean_layers(block.layers, source, cos, sin, past, cond, mask,
                                                       self._layer_call)
        final_hidden = hidden if self.chained and blocks is None else None
        return StackedContext(block_kv, embedded, final_hidden, start + length, pad)

    # -- noisy stream ------------------------------------------------------------------------
    def denoise(self, z: torch.Tensor, sigma, context: StackedContext, previous=None) -> torch.Tensor:
        """Logits of the denoiser at sigma for the last z.shape[1] positions of context, computed
        by the block that owns sigma (every row of the batch must share that block).
        ``previous`` (the sampler's last Dhat) is ignored: there is no self-conditioning."""
        sigmas = torch.as_tensor(sigma, dtype=torch.float32).flatten().tolist()
        owners = {self.block_for_sigma(value) for value in sigmas}
        if len(owners) != 1:
            raise ValueError(f"one denoise call runs one block; sigmas {sigmas} span blocks {sorted(owners)}")
        return self.denoise_block(owners.pop(), z, sigma, context)

    def denoise_block(self, block_index: int, z: torch.Tensor, sigma, context: StackedContext) -> torch.Tensor:
        """Block ``block_index`` as the denoiser at sigma: z (B, Tq, C) -> logits (B, Tq, V)."""
        batch, length = z.shape[0], z.shape[1]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(batch)
        pre = precondition(sigma, self.sigma_data)
        cos, sin, mask = self._noisy_positions(length, context, z.device)
        block = self._use_block(block_index)
        hidden = block.inject(pre.c_in[:, None, None] * z, context.embedded[:, -length:])
        cond = self.sigma_embedder(pre.c_noise)
        for layer, kv in zip(block.layers, context.block_kv[block_index]):
            hidden, _ = self._layer_call(layer, hidden, cos, sin, cond, kv, mask)
        return self.logits_from(pre.denoised(z, block.denoiser_out(block.norm(hidden))) / self.target_scale)

    def dense_logits(self, context: StackedContext) -> torch.Tensor:
        """Dense baseline: the chained stack's logits for every encoded position."""
        if context.final_hidden is None:
            raise ValueError("dense logits need the chained clean stream (chained=True: objective=dense)")
        return self.logits_from(context.final_hidden)

    def forward(self, inputs: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, block_index: int):
        """Training pass of ONE block: its clean stream over ``inputs`` and its denoiser on ``noisy``."""
        return self.denoise_block(block_index, noisy, sigma, self.encode(inputs, blocks=[block_index]))


class HostOffload:
    """On a GPU, keep every block's weights and optimizer state in host memory except the
    block in use, which is moved to the device when a forward pass needs it (single-process
    block-wise training: one block per step). Parameters keep their identity when moved, so
    the optimizer's state, keyed by them, follows with ``_move``. Untested here (no GPU)."""

    def __init__(self, model: StackedLM, optimizer: torch.optim.Optimizer, device, host="cpu"):
        self.model, self.optimizer, self.device, self.host = model, optimizer, torch.device(device), host
        self.active = None
        for block in model.blocks:
            self._move(block, host)

    def _move(self, block: DiffusionBlock, device) -> None:
        block.to(device)
        for parameter in block.parameters():
            state = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(device, non_blocking=True)

    def activate(self, block_index: int) -> None:
        if block_index == self.active:
            return
        if self.active is not None:
            self._move(self.model.blocks[self.active], self.host)
        self._move(self.model.blocks[block_index], self.device)
        self.active = block_index
