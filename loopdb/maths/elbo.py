"""The diffusion variational bound on -log p(x) for discrete targets (docs/method.md#scoring, "ELBO").

Forward process (variance exploding): z_sigma = y + sigma * eps, y the unit-norm
embedding of the token. For the ancestral sampler on a descending grid
s_0 > ... > s_{K-1}, every term is an expectation under the forward process, so
all positions are scored in parallel (VDM, Kingma et al. 2021; Plaid, Gulrajani &
Hashimoto 2023):

  -log p(x) <= KL(q(z_{s_0} | y) || N(0, (s_0^2 + sd^2) I))                    prior
             + sum_i 1/2 (1/s_{i+1}^2 - 1/s_i^2) E ||y - yhat(z_{s_i}, s_i)||^2   K-1 denoising terms
             + E[-log p(x | z_{s_{K-1}})]                                       reconstruction

The middle term is the KL between the forward posterior q(z_s | z_t, y) and the
ancestral step that uses yhat in place of y (they share the variance
s^2 (t^2 - s^2) / t^2). As K grows it tends to the continuous-time bound
1/2 int ||y - yhat||^2 d(1/sigma^2) between sigma_min and sigma_max, estimated
here by stratified samples of ln sigma. Nothing here knows about a network:
``denoise(z, sigma) -> (yhat, logits)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

DenoiseFn = Callable[[torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor]"]


def prior_kl(y: torch.Tensor, sigma_max: float, sigma_data: float) -> torch.Tensor:
    """KL(N(y, s^2 I) || N(0, (s^2 + sd^2) I)) summed over the last dim; (...)."""
    variance = sigma_max**2 + sigma_data**2
    dims = y.shape[-1]
    return 0.5 * ((dims * sigma_max**2 + (y.float() ** 2).sum(-1)) / variance - dims
                  - dims * math.log(sigma_max**2 / variance))


def _squared_error(denoise: DenoiseFn, y, sigma: float, generator) -> torch.Tensor:
    noise = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
    estimate, _ = denoise(y + sigma * noise, sigma)
    return ((y.float() - estimate.float()) ** 2).sum(-1)


def _reconstruction(denoise: DenoiseFn, y, tokens, sigma: float, generator) -> torch.Tensor:
    noise = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
    _, logits = denoise(y + sigma * noise, sigma)
    return -torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)


def discrete_elbo(denoise: DenoiseFn, y: torch.Tensor, tokens: torch.Tensor, grid: list[float], sigma_data: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Upper bound on -log p(token) in nats, one noise draw per term, for each position; (...)."""
    bound = prior_kl(y, grid[0], sigma_data)
    for sigma, sigma_next in zip(grid, grid[1:]):
        bound = bound + 0.5 * (sigma_next**-2 - sigma**-2) * _squared_error(denoise, y, sigma, generator)
    return bound + _reconstruction(denoise, y, tokens, grid[-1], generator)


def continuous_elbo(denoise: DenoiseFn, y: torch.Tensor, tokens: torch.Tensor, sigma_min: float, sigma_max: float,
                    sigma_data: float, num_sigmas: int, generator: torch.Generator) -> torch.Tensor:
    """The K -> infinity bound: 1/2 int ||y - yhat||^2 d(1/sigma^2) = int ||y - yhat||^2 / sigma^2 d ln sigma,
    estimated with ``num_sigmas`` stratified draws of ln sigma (one per stratum, uniform inside)."""
    log_lo, log_hi = math.log(sigma_min), math.log(sigma_max)
    width = (log_hi - log_lo) / num_sigmas
    offsets = torch.rand(num_sigmas, generator=generator, dtype=torch.float64)
    total = prior_kl(y, sigma_max, sigma_data) + _reconstruction(denoise, y, tokens, sigma_min, generator)
    for stratum in range(num_sigmas):
        sigma = math.exp(log_lo + (stratum + float(offsets[stratum])) * width)
        total = total + width * _squared_error(denoise, y, sigma, generator) / sigma**2
    return total


def exact_denoiser(table: torch.Tensor, log_prior: torch.Tensor) -> DenoiseFn:
    """The Bayes-optimal denoiser for y drawn from ``table`` rows with prior ``log_prior``
    (the oracle of the tests): posterior over rows given z, and its mean."""

    def denoise(z, sigma):
        distances = ((z[..., None, :] - table) ** 2).sum(-1)  # (..., V)
        logits = log_prior - distances / (2 * sigma**2)
        return F.softmax(logits, -1) @ table, logits

    return denoise
