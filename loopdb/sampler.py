"""The sampler: a pure function of (denoiser, initial state, sigma grid).

For a looped model one loop iteration is one sampler step, so ``num_loops`` IS
the grid length (EDM's ``num_steps``). Nothing here knows about a model family.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .edm import euler_step, heun_step

# denoise(z, sigma) -> (Dhat, output): the clean-target estimate that drives the
# ODE and whatever the caller wants back from the last evaluation (e.g. logits).
StepFn = Callable[[torch.Tensor, float], "tuple[torch.Tensor, Any]"]


def run_sampler(denoise: StepFn, z: torch.Tensor, grid: list[float], solver: str = "euler") -> Any:
    """Walk the descending ``grid``; return the output of the evaluation at its last sigma.

    Euler: len(grid) evaluations. Heun: one extra evaluation per step except the last.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}; choose 'euler' or 'heun'")
    output = None
    for index, sigma in enumerate(grid):
        denoised, output = denoise(z, sigma)
        if index + 1 == len(grid):
            break
        sigma_next = grid[index + 1]
        if solver == "euler":
            z = euler_step(z, denoised, sigma, sigma_next)
        else:
            z = heun_step(lambda state, s: denoise(state, s)[0], z, denoised, sigma, sigma_next)
    return output
