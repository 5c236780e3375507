"""Sampler schedules across positions: which sigma each position sits at, at each loop.

A sequence-joint denoiser (loopdb.models.joint) takes one sigma per position, so the K loops
need not move every position down the grid together:
- one sigma for all (width 0): every position follows the grid s_0 > ... > s_{K-1};
- wavefront (width W > 0): at loop i, position t has progress
      p(i, t) = clamp(i/(K-1) * (1 + W) - W * t/(T-1), 0, 1)
  along the same grid curve, so earlier positions run ahead of later ones (they resolve first and
  later positions read them) and every position ends on the grid's last sigma.
K = 1 is one evaluation at sigma_max for every position and width; a lone position (generation's
newest token) follows the grid whatever the width.
"""

from __future__ import annotations

from typing import Callable

import torch


def position_progress(num_loops: int, length: int, width: float = 0.0) -> torch.Tensor:
    """p(i, t) in [0, 1], (K, T), float64. Width 0 gives i/(K-1) at every position."""
    if num_loops < 1:
        raise ValueError(f"the number of loops must be >= 1, got {num_loops}")
    if width < 0:
        raise ValueError(f"the wavefront width must be >= 0, got {width}")
    if num_loops == 1:
        return torch.zeros(1, length, dtype=torch.float64)
    return wavefront_progress(torch.arange(num_loops, dtype=torch.float64)[:, None] / (num_loops - 1), length, width)


def wavefront_progress(fraction: torch.Tensor, length: int, width) -> torch.Tensor:
    """p(t) = clamp(f * (1 + W) - W * t/(T-1), 0, 1), (N, T), for the descent's fractions f (N, 1) in [0, 1];
    ``width``: one W, or one per row (N, 1)."""
    fraction = fraction.to(torch.float64)
    if (not torch.is_tensor(width) and width == 0) or length == 1:
        return fraction.expand(fraction.shape[0], length).clone()
    position = torch.arange(length, dtype=torch.float64)[None, :] / (length - 1)
    return (fraction * (1 + width) - width * position).clamp(0.0, 1.0)


def position_sigmas(num_loops: int, length: int, curve: Callable[[float], float], sigma_max: float,
                    sigma_last: float, width: float = 0.0) -> torch.Tensor:
    """The sigma of every position at every loop, (K, T) float32: ``curve`` (loopdb.maths.edm.grid_curve)
    at each progress; progress 0 is exactly sigma_max and 1 exactly sigma_last."""
    progress = position_progress(num_loops, length, width)
    table = {}
    for value in progress.unique().tolist():
        table[value] = sigma_max if value == 0.0 else sigma_last if value == 1.0 else curve(value)
    return torch.tensor([[table[value] for value in row] for row in progress.tolist()], dtype=torch.float32)
