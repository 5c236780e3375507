"""Sequence-joint DiffusionBlocks (loopdb.models.joint): ONE forward/backward pass per step.

Every position's state is its own target embedding noised at a sampled sigma; the denoiser runs
once over the whole sequence and the loss is the cross-entropy of its logits (unit weight). A
share ``position_sigma_fraction`` of the sequences draws a sigma per position (diffusion forcing),
the rest one sigma per sequence, so the network learns both to read neighbours at its own noise
level and at others'. The training sigmas follow ``sigma_sampling`` over [sigma_min, sigma_max]:
``loguniform`` covers sigma_max, where every sampler starts, as often as any other octave. With
``clean_prompt`` a task's prompt positions are drawn at the last sigma instead. A
``clean_context_fraction`` share of the sequences is teacher-forced: each position reads the earlier
ones at their clean targets (a second, clean stream in the same pass) instead of their noisy states.
"""

from __future__ import annotations

import math

import torch

from ..maths.schedules import wavefront_progress
from .next_token import mean_cross_entropy, noised_targets, split_batch

WAVEFRONT_WIDTHS = (0.5, 8.0)  # the widths a wavefront_sigma_fraction row is drawn at (log-uniform)


def training_sigmas(diffusion, schedule, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B, T) sigmas: per position for a ``position_sigma_fraction`` share of rows, else one per row;
    then a ``wavefront_sigma_fraction`` share of rows laid out as the wavefront sampler lays them out."""
    batch, length = shape
    if diffusion.sigma_sampling == "loguniform":
        log_lo, log_hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
        draw = lambda n: torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator, dtype=torch.float64)).float()
    else:
        draw = lambda n: schedule.sample_sigmas(n, generator)
    per_sequence = draw(batch)[:, None].expand(batch, length)
    fraction = diffusion.position_sigma_fraction
    sigma = per_sequence.contiguous()
    if fraction > 0:
        per_position = draw(batch * length).view(batch, length)
        independent = torch.rand(batch, generator=generator) < fraction
        sigma = torch.where(independent[:, None], per_position, per_sequence)
    if diffusion.wavefront_sigma_fraction > 0:
        # the wavefront sampler's own layout at a random point of its descent (log-linear from sigma_max to
        # sigma_min) and a random width (log-uniform in WAVEFRONT_WIDTHS), so the sampler's width stays free
        widths = torch.exp(torch.empty(batch, 1, dtype=torch.float64).uniform_(*map(math.log, WAVEFRONT_WIDTHS),
                                                                               generator=generator))
        progress = wavefront_progress(torch.rand(batch, 1, generator=generator), length, widths)
        log_max, log_min = math.log(schedule.sigma_max), math.log(schedule.sigma_min)
        on_front = torch.exp(log_max + (log_min - log_max) * progress).float()
        chosen = torch.rand(batch, generator=generator) < diffusion.wavefront_sigma_fraction
        sigma = torch.where(chosen[:, None], on_front, sigma)
    return sigma


class JointDiffusionObjective:
    """The loss only; what K loops are at inference is loopdb.sampling's JointSampler."""

    def loss(self, model, batch, generator: torch.Generator, step: int = 0):
        inputs, targets = split_batch(batch)
        sigma = training_sigmas(model.diffusion, model.schedule, tuple(inputs.shape), generator).to(inputs.device)
        prompt = model.prompt_mask(inputs)
        if prompt is not None:  # clean_prompt: a task's prompt is drawn at the last sigma, where inference holds it
            sigma = torch.where(prompt, model.sigma_last, sigma)
        noisy = noised_targets(model, targets, sigma, generator)
        forced = round(model.diffusion.clean_context_fraction * inputs.shape[0])
        logits = []
        if forced:  # teacher forcing: these rows read the earlier positions clean, through a second stream
            logits.append(model(inputs[:forced], noisy[:forced], sigma[:forced],
                                clean_targets=targets[:forced].clamp(min=0)))
        if forced < inputs.shape[0]:
            logits.append(model(inputs[forced:], noisy[forced:], sigma[forced:]))
        cross_entropy = mean_cross_entropy(torch.cat(logits), targets)
        return cross_entropy, {"ce": cross_entropy.detach(), "sigma_median": sigma.median().detach()}
