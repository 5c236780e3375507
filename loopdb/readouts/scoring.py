"""Scoring a next-token model at any loop count (generation: loopdb.readouts.generation).

K loops = K sampler steps on a sigma grid computed from K for DiffusionBlocks,
K recurrent iterations for BPTT, and one plain pass for a dense model: each
model's sampler (loopdb.sampling) says what a loop is, so every family is
scored and sampled here through the same functions. The clean stream is encoded
once per sequence (or once per new token with the cache) and shared by every loop.

Scoring (docs/method.md#scoring, "predictive"): a deterministic sampler commits to one token per
noise draw, so the last step's distribution for ONE draw is not the model's
predictive distribution. We estimate log p(x_{t+1}) by log-mean-exp of the last
step's probability over N noise draws and always report N.
"""

from __future__ import annotations

import math

import torch

from ..maths.elbo import continuous_elbo, discrete_elbo
from ..names import READOUTS
from ..sampling import DIFFUSION, anchor_sampler, sampler_of


def loop_logits(model, context, z: torch.Tensor, num_loops: int, generator: torch.Generator | None = None,
                sampler=None):
    """Run ``num_loops`` loops from z; return the logits of the last one. ``sampler`` (default: the
    model's, loopdb.sampling.sampler_of) says what a loop is; ``generator`` feeds samplers that draw
    along the way (ancestral steps, sampled estimates)."""
    return (sampler or sampler_of(model)).final_logits(model, context, z, num_loops, generator)


def initial_noise(model, shape, num_loops: int, generator: torch.Generator, device, sampler=None):
    return (sampler or sampler_of(model)).initial_state(model, shape, num_loops, generator, device)


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, num_loops: int, generator: torch.Generator,
                        sampler=None) -> torch.Tensor:
    """One noise draw: log p(x_{t+1} | x_{<=t}) at the last loop, for windows (B, T+1) -> (B, T)."""
    inputs, next_tokens = windows[:, :-1], windows[:, 1:]
    context = model.encode(inputs)
    z = initial_noise(model, (*inputs.shape, model.config.d_model), num_loops, generator, windows.device, sampler)
    logits = loop_logits(model, context, z, num_loops, generator, sampler)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, next_tokens[..., None]).squeeze(-1)


@torch.no_grad()
def predictive_logprobs(model, windows: torch.Tensor, num_loops: int, samples: int,
                        generator: torch.Generator, sampler=None) -> torch.Tensor:
    """log of the mean over ``samples`` noise draws of p(x_{t+1}); (B, T). The clean stream is
    encoded once; each draw takes its initial state, then its loop's draws, from ``generator``."""
    inputs, next_tokens = windows[:, :-1], windows[:, 1:]
    shape = (*inputs.shape, model.config.d_model)
    draw = lambda: initial_noise(model, shape, num_loops, generator, windows.device, sampler)  # noqa: E731
    log_probs = predictive_core(model, model.encode(inputs), num_loops, samples, draw, generator, sampler)
    return log_probs.gather(-1, next_tokens[..., None]).squeeze(-1)


def predictive_core(model, context, num_loops: int, samples: int, draw_state, loop_generator,
                    sampler=None) -> torch.Tensor:
    """THE predictive readout (docs/method.md#scoring), shared by ``loopdb score``, the lm-eval adapter and the
    study: log of the mean over ``samples`` draws of the last loop's next-token distribution,
    (B, T, V), against ONE encoding ``context`` of the clean stream. ``draw_state()`` gives a draw's
    initial state (None for a model that draws no noise: evaluated once); the draws are accumulated
    with logaddexp, so one (B, T, V) tensor is kept whatever ``samples`` is."""
    total = None
    for _ in range(samples):
        state = draw_state()
        draw = torch.log_softmax(loop_logits(model, context, state, num_loops, loop_generator, sampler).float(),
                                 dim=-1)
        if state is None:  # deterministic: every draw would be the same
            return draw
        total = draw if total is None else torch.logaddexp(total, draw)
    return total - math.log(samples)


ELBO_CONTINUOUS_SIGMAS = 32  # stratified ln-sigma draws per continuous-ELBO estimate (fixed: numbers compare)


@torch.no_grad()
def elbo_logprobs(model, windows: torch.Tensor, num_loops: int | None, samples: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Minus the diffusion ELBO of each next token (a lower bound on log p), averaged over
    ``samples`` draws; the K-step discrete bound of the ancestral sampler on the model's
    grid, or the continuous-time bound when num_loops is None."""
    if sampler_of(model) is not DIFFUSION:
        raise ValueError(f"the ELBO readouts need a diffusion model; this one loops as {model.loop} "
                         "(use readout=predictive)")
    inputs, next_tokens = windows[:, :-1], windows[:, 1:]
    context = model.encode(inputs)
    targets = model.targets(next_tokens)

    def denoise(z, sigma):
        logits = model.denoise(z, sigma, context)
        return model.soft_denoised(logits), logits

    bounds = []
    for _ in range(samples):
        if num_loops is None:
            bounds.append(continuous_elbo(denoise, targets, next_tokens, model.schedule.sigma_min,
                                          model.schedule.sigma_max, model.sigma_data, ELBO_CONTINUOUS_SIGMAS,
                                          generator))
        else:
            bounds.append(discrete_elbo(denoise, targets, next_tokens, DIFFUSION.grid(model, num_loops),
                                        model.sigma_data, generator))
    return -torch.stack(bounds).mean(0)


def token_logprobs(model, windows: torch.Tensor, num_loops: int, readout: str, samples: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(B, T) log-likelihood of each next token under a named readout (docs/method.md#scoring):
        predictive       log of the last loop's probability averaged over ``samples`` noise draws;
        last             the last loop's log-probability averaged over draws (one draw: the biased readout);
        elbo             minus the K-step diffusion ELBO (a bound: never above the true log p);
        elbo_continuous  minus the continuous-time ELBO (independent of K);
        anchor           the dense anchor head's next-token log-probability (independent of K)."""
    if readout == "anchor":
        return next_token_logprobs(model, windows, 1, generator, anchor_sampler(model))
    if readout == "predictive":
        return predictive_logprobs(model, windows, num_loops, samples, generator)
    if readout == "last":
        return torch.stack([next_token_logprobs(model, windows, num_loops, generator) for _ in range(samples)]).mean(0)
    if readout == "elbo":
        return elbo_logprobs(model, windows, num_loops, samples, generator)
    if readout == "elbo_continuous":
        return elbo_logprobs(model, windows, None, samples, generator)
    raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")


@torch.no_grad()
def bits_per_byte(model, windows: list[torch.Tensor], token_bytes: torch.Tensor, num_loops: int, samples: int = 1,
                  seed: int = 0, batch_size: int = 16, device="cpu", progress=None,
                  readout: str = "predictive") -> float:
    """Bits per byte over ``windows`` (each (T+1,) tokens; every token after the first of
    a window is scored) under ``readout``. Same seed -> same noise -> same number."""
    generator = torch.Generator().manual_seed(seed)
    total_nats, total_bytes = 0.0, 0
    for batch in same_length_batches(windows, batch_size, device, progress):
        logprobs = token_logprobs(model, batch, num_loops, readout, samples, generator)
        total_nats -= logprobs.sum().item()
        total_bytes += int(token_bytes[batch[:, 1:].cpu()].sum())
    return total_nats / math.log(2) / max(total_bytes, 1)


def same_length_batches(windows: list[torch.Tensor], batch_size: int, device="cpu", progress=None):
    """Stacks of up to ``batch_size`` consecutive windows of equal length on ``device``
    (a short last window gets its own batch); ``progress`` counts the windows done."""
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        for length in sorted({len(w) for w in chunk}):
            yield torch.stack([w for w in chunk if len(w) == length]).to(device)
        if progress is not None:
            progress.update(len(chunk))


# -- per-row noise and whole distributions (used by the lm-eval adapter, evaluation.lm_eval_model) --
@torch.no_grad()
def predictive_distribution(model, inputs: torch.Tensor, num_loops: int, samples: int,
                            generators: list, lengths: list | None = None, sampler=None) -> torch.Tensor:
    """log of the mean over ``samples`` noise draws of the last loop's next-token distribution
    at EVERY position and for every token: inputs (B, T) -> (B, T, V) log-probabilities.

    Row i draws its noise from its own ``generators[i]`` for its first ``lengths[i]`` positions
    (default: all T); the rest of the row is right padding, which a causal model never shows to
    earlier positions (its outputs there are meaningless). So a row's numbers do not depend on
    the other rows of the batch. A sampler that also draws along the way (ancestral steps,
    sampled estimates) gets the row's generator too: directly for one row; for several rows the
    call notices that the loop consumed randomness and recomputes the rows one at a time. For
    one full-length row, gathering the next tokens gives ``predictive_logprobs`` of the same
    window with an identically seeded generator (the same draws in the same order). A model
    whose sampler draws no noise (initial state None) is evaluated once. ``sampler``: as in loop_logits.
    """
    batch, length = inputs.shape
    lengths = [length] * batch if lengths is None else [int(n) for n in lengths]
    if len(generators) != batch or len(lengths) != batch:
        raise ValueError(f"need one generator and one length per row: {batch} rows, "
                         f"{len(generators)} generators, {len(lengths)} lengths")
    if batch == 1:
        return _predictive_rows(model, inputs, num_loops, samples, generators, lengths, generators[0], sampler)
    states = [generator.get_state() for generator in generators]
    probe = torch.Generator().manual_seed(0)
    unused = probe.get_state()
    result = _predictive_rows(model, inputs, num_loops, samples, generators, lengths, probe, sampler)
    if torch.equal(probe.get_state(), unused):
        return result
    for generator, state in zip(generators, states):  # the loop draws: one row at a time instead
        generator.set_state(state)
    for row, (generator, n) in enumerate(zip(generators, lengths)):
        result[row, :n] = _predictive_rows(model, inputs[row:row + 1, :n], num_loops, samples, [generator], [n],
                                           generator, sampler)[0]
    return result


def _predictive_rows(model, inputs, num_loops, samples, generators, lengths, loop_generator, sampler) -> torch.Tensor:
    batch, length = inputs.shape
    width = model.config.d_model

    def draw_state():  # row i's initial state from its own generator, for its first lengths[i] positions
        rows = [initial_noise(model, (1, n, width), num_loops, generator, inputs.device, sampler)
                for generator, n in zip(generators, lengths)]
        if rows[0] is None:
            return None
        state = torch.zeros(batch, length, *rows[0].shape[2:], dtype=rows[0].dtype, device=inputs.device)
        for index, (row, n) in enumerate(zip(rows, lengths)):
            state[index, :n] = row[0]
        return state

    return predictive_core(model, model.encode(inputs), num_loops, samples, draw_state, loop_generator, sampler)
