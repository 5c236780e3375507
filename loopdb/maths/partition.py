"""Partitions of the noise axis into B DiffusionBlocks: which block trains where, and
which block runs a sampler step. One implementation for every family: the sigma axis
of the EDM families (stacked LM, ViT, DiT; widths measured in log sigma) and the t axis
of the masked diffusion LM (widths measured in t).

Block 0 is nearest the INPUT, the first to run when sampling, and owns the HIGHEST
range (most noise, or most masked) (docs/method.md#edm).
"""

from __future__ import annotations

import math

from .edm import NoiseSchedule


class BlockPartition:
    """Ascending boundaries b_0 < ... < b_B of B ranges; ``log``: widths in log space."""

    def __init__(self, boundaries: list[float], overlap: float = 0.0, log: bool = True):
        if len(boundaries) < 2:
            raise ValueError(f"a partition needs at least two boundaries, got {boundaries}")
        self.boundaries, self.overlap, self.log = list(boundaries), overlap, log

    @property
    def num_blocks(self) -> int:
        return len(self.boundaries) - 1

    def training_range(self, block_index: int) -> tuple[float, float]:
        """A block's range widened by ``overlap`` x its width on each side, clipped to the axis."""
        num_blocks = self.num_blocks
        if not 0 <= block_index < num_blocks:
            raise ValueError(f"block_index {block_index} out of range for {num_blocks} blocks")
        lo, hi = self.boundaries[num_blocks - 1 - block_index], self.boundaries[num_blocks - block_index]
        first, last = self.boundaries[0], self.boundaries[-1]
        if self.log:
            width = math.log(hi) - math.log(lo)
            return (max(first, math.exp(math.log(lo) - self.overlap * width)),
                    min(last, math.exp(math.log(hi) + self.overlap * width)))
        width = hi - lo
        return max(first, lo - self.overlap * width), min(last, hi + self.overlap * width)

    def owner(self, value: float) -> int:
        """The block that owns ``value`` at inference (no overlap; a boundary goes to the lower range's block)."""
        num_blocks = self.num_blocks
        for block_index in range(num_blocks):  # ranges from the top down
            if value > self.boundaries[num_blocks - 1 - block_index]:
                return block_index
        return num_blocks - 1


def sigma_boundaries(schedule: NoiseSchedule, num_blocks: int, kind: str = "equiprob") -> list[float]:
    """Ascending sigma_min = s_0 < ... < s_B = sigma_max. ``equiprob``: each range holds equal
    probability under the training log-normal (the paper's choice); ``uniform``: equal width in log sigma."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if kind == "equiprob":
        q_min, q_max = schedule.q_min, schedule.q_max
        inner = [schedule.sigma_at(q_min + b / num_blocks * (q_max - q_min)) for b in range(1, num_blocks)]
    elif kind == "uniform":
        lmin, lmax = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
        inner = [math.exp(lmin + b / num_blocks * (lmax - lmin)) for b in range(1, num_blocks)]
    else:
        raise ValueError(f"unknown partition {kind!r}; choose 'equiprob' or 'uniform'")
    return [schedule.sigma_min, *inner, schedule.sigma_max]


def sigma_partition(schedule: NoiseSchedule, num_blocks: int, kind: str = "equiprob",
                    overlap: float = 0.0) -> BlockPartition:
    return BlockPartition(sigma_boundaries(schedule, num_blocks, kind), overlap, log=True)


def time_boundaries(num_blocks: int) -> list[float]:
    """Masked diffusion, linear schedule alpha(t) = 1 - t: t_b = b/B gives equal alpha decrements."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return [b / num_blocks for b in range(num_blocks + 1)]


def time_partition(num_blocks: int, overlap: float = 0.0) -> BlockPartition:
    return BlockPartition(time_boundaries(num_blocks), overlap, log=False)
