"""EDM machinery shared by every loopdb model (docs/method.md#edm).

Noise levels, the training noise distribution, the block partition of the noise
range, preconditioning, loss weights, sampler grids and sampler steps. Nothing
here knows about a network: a denoiser is any callable ``(z, sigma) -> Dhat``.

Grids are computed from the step count on every call and never stored, so a
checkpoint runs at any number of steps (docs/method.md#pitfall-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import torch

_STD_NORMAL = NormalDist()


@dataclass(frozen=True)
class NoiseSchedule:
    """Truncated log-normal over [sigma_min, sigma_max]: ln sigma ~ N(p_mean, p_std)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        if self.p_std <= 0:
            raise ValueError(f"p_std must be positive, got {self.p_std}")

    # -- quantile <-> sigma ---------------------------------------------------
    def cdf(self, sigma: float) -> float:
        """P(ln s < ln sigma) under the UNtruncated log-normal."""
        return _STD_NORMAL.cdf((math.log(sigma) - self.p_mean) / self.p_std)

    def sigma_at(self, q: float) -> float:
        """Inverse of cdf (q in (0, 1))."""
        return math.exp(self.p_mean + self.p_std * _STD_NORMAL.inv_cdf(q))

    @property
    def q_min(self) -> float:
        return self.cdf(self.sigma_min)

    @property
    def q_max(self) -> float:
        return self.cdf(self.sigma_max)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None,
               lo: float | None = None, hi: float | None = None) -> torch.Tensor:
        """n sigmas from the log-normal truncated to [lo, hi] (default: the global range).

        Inverse-CDF sampling (never rejection): uniform q in [cdf(lo), cdf(hi)].
        """
        lo = self.sigma_min if lo is None else lo
        hi = self.sigma_max if hi is None else hi
        q_lo, q_hi = self.cdf(lo), self.cdf(hi)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        q = q_lo + u * (q_hi - q_lo)
        z = torch.special.ndtri(q)
        sigma = torch.exp(self.p_mean + self.p_std * z)
        return sigma.clamp(lo, hi).float()


# -- preconditioning and loss weight (EDM, Karras et al. 2022, Table 1) ----------
@dataclass(frozen=True)
class Precond:
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor

    def denoised(self, z: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """D = c_skip * z + c_out * F, the one place D is assembled; per-example coefficients
        of shape (B,) broadcast over z's other dimensions."""
        c_skip, c_out = self.c_skip, self.c_out
        if c_skip.dim() == 1 and z.dim() > 1:
            c_skip, c_out = c_skip.view(-1, *[1] * (z.dim() - 1)), c_out.view(-1, *[1] * (z.dim() - 1))
        return c_skip * z + c_out * output


def precondition(sigma: torch.Tensor, sigma_data: float) -> Precond:
    """D = c_skip * z + c_out * F(c_in * z, c_noise)."""
    s2, sd2 = sigma**2, sigma_data**2
    return Precond(
        c_skip=sd2 / (s2 + sd2),
        c_out=sigma * sigma_data / torch.sqrt(s2 + sd2),
        c_in=1.0 / torch.sqrt(s2 + sd2),
        c_noise=torch.log(sigma) / 4,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float, kind: str = "edm", clamp: float | None = None) -> torch.Tensor:
    """EDM weight (s^2 + sd^2) / (s * sd)^2, or 1 ("unit"). ``clamp`` caps the EDM weight."""
    if kind == "unit":
        return torch.ones_like(sigma)
    if kind != "edm":
        raise ValueError(f"unknown loss weight {kind!r}; choose 'edm' or 'unit'")
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight.clamp(max=clamp) if clamp else weight


# -- sampler grids ----------------------------------------------------------------
def sigma_grid(num_steps: int, schedule: NoiseSchedule, kind: str = "equiprob",
               sigma_last: float | None = None, rho: float = 7.0) -> list[float]:
    """Descending grid s_0 = sigma_max > ... > s_{T-1} = sigma_last (default sigma_min).

        equiprob: equally spaced in the training distribution's quantiles;
        karras:   Karras et al.'s rho-spaced grid.
    A grid of one step is a single evaluation at sigma_max (a direct prediction).
    """
    if num_steps < 1:
        raise ValueError(f"the number of loops/steps must be >= 1, got {num_steps}")
    hi = schedule.sigma_max
    lo = schedule.sigma_min if sigma_last is None else sigma_last
    if not 0 < lo <= hi:
        raise ValueError(f"grid's last sigma must be in (0, sigma_max], got {lo}")
    if num_steps == 1:
        return [hi]
    to_sigma = grid_curve(schedule, kind, lo, rho)
    grid = [to_sigma(i / (num_steps - 1)) for i in range(num_steps)]
    grid[0], grid[-1] = hi, lo  # exact end points despite float round trips
    return grid


GRID_KINDS = ("equiprob", "karras", "geometric")


def grid_curve(schedule: NoiseSchedule, kind: str, sigma_last: float, rho: float = 7.0) -> Callable[[float], float]:
    """The sigma a grid of kind ``kind`` reaches at progress f in [0, 1] (f=0: sigma_max, 1: sigma_last).

        equiprob:  equally spaced in the training distribution's quantiles (log-normal);
        karras:    Karras et al.'s rho-spaced curve;
        geometric: equally spaced in log sigma (equiprob for a log-uniform training distribution).
    """
    hi, lo = schedule.sigma_max, sigma_last
    if kind == "equiprob":
        q_hi, q_lo = schedule.cdf(hi), schedule.cdf(lo)
        return lambda f: schedule.sigma_at(q_hi + f * (q_lo - q_hi))
    if kind == "karras":
        a, b = hi ** (1 / rho), lo ** (1 / rho)
        return lambda f: (a + f * (b - a)) ** rho
    if kind == "geometric":
        log_hi, log_lo = math.log(hi), math.log(lo)
        return lambda f: math.exp(log_hi + f * (log_lo - log_hi))
    raise ValueError(f"unknown grid {kind!r}; choose one of {', '.join(GRID_KINDS)}")


# -- sampler steps ------------------------------------------------------------------
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dz/dsigma = (z - D) / sigma.

    Moving to a smaller sigma moves z TOWARD the denoised estimate
    (docs/method.md#edm: the paper's printed sign is flipped).
    """
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def heun_step(denoise: Denoiser, z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Heun's 2nd-order correction (EDM Algorithm 1): average the slopes at sigma and sigma_next."""
    z_euler = euler_step(z, denoised, sigma, sigma_next)
    if bool((torch.as_tensor(sigma_next) <= 0).all()):  # a grid entry may be a tensor of per-position sigmas
        return z_euler
    denoised_next = denoise(z_euler, sigma_next)
    slope = 0.5 * ((z - denoised) / sigma + (z_euler - denoised_next) / sigma_next)
    return z + (sigma_next - sigma) * slope


def initial_state(shape, sigma_max, sigma_data: float, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """z at the top of the grid: the marginal of y + sigma_max * eps, variance sd^2 + s_max^2.
    ``sigma_max``: a float, or a tensor of per-position sigmas that broadcasts against ``shape``."""
    # draw on the generator's device so a CPU generator seeds CUDA runs identically
    noise = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
    if torch.is_tensor(sigma_max):
        return noise.to(device) * (sigma_data**2 + sigma_max.to(device)**2).sqrt()
    return noise.to(device) * math.sqrt(sigma_data**2 + sigma_max**2)
