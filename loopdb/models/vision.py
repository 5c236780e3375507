"""What the two vision families (vit, dit) share: patches, the layer stack split into
DiffusionBlocks, and the block <-> noise-range assignment used by training AND sampling.

Design (docs/method.md#vision; [ours] where the paper is silent):
- ``n_layers`` adaLN-Zero layers in ``num_blocks`` contiguous blocks; block 0 is
  nearest the input and owns the HIGHEST noise range (equi-probability partition of
  the training log-normal, loopdb.maths.partition).
- DiffusionBlocks training: one block per step, uniformly, for the whole batch; sigma
  from that block's range widened by ``block_overlap``; only that block's layers run,
  on the noisy target and the clean image tokens (never an earlier block's output).
- Sampling (loopdb.sampling.vision): each grid sigma is run by the block that owns it
  (``partition.owner``, no overlap), so with T = B equi-probability steps every block runs once.
- The end-to-end (``dense``) baseline runs all layers as one network.
- Images are bidirectional token sets: no rotary rotation (learned absolute
  positions [ours]) and an all-True attention mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..maths.edm import NoiseSchedule
from ..maths.partition import sigma_partition
from ..layers import Block


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), patches in row-major order."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), channels * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, size: int) -> torch.Tensor:
    """Inverse of patchify for square images: (B, N, C*p*p) -> (B, C, size, size)."""
    side = size // patch
    x = patches.reshape(patches.shape[0], side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(patches.shape[0], channels, size, size)


class VisionModel(nn.Module):
    """Base of ViTClassifier and DiTDenoiser: the schedule, the partition and the layer stack."""

    def __init__(self, config: Config, blockwise: bool = True):
        """``blockwise``: DiffusionBlocks (a step runs the block owning its sigma); False: the end-to-end
        baseline (every layer)."""
        super().__init__()
        m, d = config.model, config.diffusion
        self.config, self.diffusion = m, d
        self.blockwise = blockwise
        self.sigma_data = config.sigma_data
        self.schedule = NoiseSchedule(d.p_mean, d.p_std, d.sigma_min, d.sigma_max)
        self.partition = sigma_partition(self.schedule, m.num_blocks, overlap=d.block_overlap)  # from the config, never stored
        dim = m.d_model
        self.num_patches = (m.image_size // m.patch_size) ** 2
        self.patch_embed = nn.Linear(m.channels * m.patch_size**2, dim)
        per_block = m.n_layers // m.num_blocks
        self.blocks = nn.ModuleList(
            nn.ModuleList(Block(dim, m.n_heads, m.mlp_ratio, conditioned=True, backend=m.attention)
                          for _ in range(per_block))
            for _ in range(m.num_blocks)
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(patchify(images, self.config.patch_size))  # (B, N, C)

    def run_layers(self, x: torch.Tensor, cond: torch.Tensor, block_index: int | None) -> torch.Tensor:
        """Block ``block_index``'s layers only, or every layer (``None``: the end-to-end network)."""
        blocks = self.blocks if block_index is None else [self.blocks[block_index]]
        head_dim = self.config.d_model // self.config.n_heads
        # identity rotation (positions are learned, absolute) and no mask: bidirectional
        cos = torch.ones(x.shape[1], head_dim // 2, device=x.device)
        sin = torch.zeros_like(cos)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        for block in blocks:
            for layer in block:
                x, _ = layer(x, cos, sin, cond, mask=mask)
        return x
