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


def run_sampler(denoise: StepFn, z: torch.Tensor, grid: list[float], solver: str = "euler",
                noise: Callable[[torch.Size], torch.Tensor] | None = None, final_evaluation: bool = True) -> Any:
    """Walk the descending ``grid``; return the output of the evaluation at its last sigma. Each entry
    is handed to ``denoise`` and to the step as it is: a float, or a tensor of per-position sigmas
    that broadcasts against z (e.g. (T, 1) for z of shape (B, T, C)).

    euler: one evaluation per grid point; heun: one extra evaluation per step except
    the last; ancestral: z <- Dhat + sigma_next * fresh noise (needs ``noise(shape)``).
    With ``final_evaluation=False`` it stops on arriving at the last sigma and returns
    the state there instead (a rollout, e.g. to train on the sampler's own states).
    """
    if solver not in ("euler", "heun", "ancestral"):
        raise ValueError(f"unknown solver {solver!r}; choose euler, heun or ancestral")
    if solver == "ancestral" and noise is None:
        raise ValueError("the ancestral solver needs a noise source")
    output = None
    for index, sigma in enumerate(grid):
        if index + 1 == len(grid) and not final_evaluation:
            return z
        denoised, output = denoise(z, sigma)
        if index + 1 == len(grid):
            break
        sigma_next = grid[index + 1]
        if solver == "euler":
            z = euler_step(z, denoised, sigma, sigma_next)
        elif solver == "heun":
            z = heun_step(lambda state, s: denoise(state, s)[0], z, denoised, sigma, sigma_next)
        else:
            z = denoised + sigma_next * noise(z.shape).to(z.device, z.dtype)
    return output
