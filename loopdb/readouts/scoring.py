"""Inference with a looped model at any loop count: scoring and cached generation.

K loops = K sampler steps on a sigma grid computed from K for DiffusionBlocks,
K recurrent iterations for BPTT, and one plain pass for a dense model: each
model's objective (loopdb.objectives) says what a loop is, so every family is
scored and sampled here through the same functions. The clean stream is encoded
once per sequence (or once per new token with the cache) and shared by every loop.

Scoring (METHOD 5, "predictive"): a deterministic sampler commits to one token per
noise draw, so the last step's distribution for ONE draw is not the model's
predictive distribution. We estimate log p(x_{t+1}) by log-mean-exp of the last
step's probability over N noise draws and always report N.
"""

from __future__ import annotations

import math

import torch



def loop_logits(model, context, z: torch.Tensor, num_loops: int, generator: torch.Generator | None = None):
    """Run ``num_loops`` loops from z; return the logits of the last one (the model's objective says how).
    ``generator`` feeds samplers that draw along the way (ancestral steps, sampled estimates)."""
    return model.objective.final_logits(model, context, z, num_loops, generator)


def initial_noise(model, shape, num_loops: int, generator: torch.Generator, device):
    return model.objective.initial_state(model, shape, num_loops, generator, device)


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, num_loops: int, generator: torch.Generator) -> torch.Tensor:
    """One noise draw: log p(x_{t+1} | x_{<=t}) at the last loop, for windows (B, T+1) -> (B, T)."""
    inputs, next_tokens = windows[:, :-1], windows[:, 1:]
    context = model.encode(inputs)
    z = initial_noise(model, (*inputs.shape, model.config.d_model), num_loops, generator, windows.device)
    logits = loop_logits(model, context, z, num_loops, generator)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, next_tokens[..., None]).squeeze(-1)


@torch.no_grad()
def predictive_logprobs(model, windows: torch.Tensor, num_loops: int, samples: int,
                        generator: torch.Generator) -> torch.Tensor:
    """log of the mean over ``samples`` noise draws of p(x_{t+1}); (B, T)."""
    draws = torch.stack([next_token_logprobs(model, windows, num_loops, generator) for _ in range(samples)])
    return torch.logsumexp(draws, dim=0) - math.log(samples)


READOUTS = ("predictive", "last", "elbo", "elbo_continuous")
ELBO_CONTINUOUS_SIGMAS = 32  # stratified ln-sigma draws per continuous-ELBO estimate (fixed: numbers compare)


@torch.no_grad()
def elbo_logprobs(model, windows: torch.Tensor, num_loops: int | None, samples: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Minus the diffusion ELBO of each next token (a lower bound on log p), averaged over
    ``samples`` draws; the K-step discrete bound of the ancestral sampler on the model's
    grid, or the continuous-time bound when num_loops is None."""
    from ..maths.elbo import continuous_elbo, discrete_elbo

    if model.objective.name != "diffusion":
        raise ValueError(f"the ELBO readouts need a diffusion model; this one was trained with "
                         f"objective={model.objective.name} (use readout=predictive)")
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
            bounds.append(discrete_elbo(denoise, targets, next_tokens, model.objective.grid(model, num_loops),
                                        model.sigma_data, generator))
    return -torch.stack(bounds).mean(0)


def token_logprobs(model, windows: torch.Tensor, num_loops: int, readout: str, samples: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(B, T) log-likelihood of each next token under a named readout (METHOD 5):
        predictive       log of the last loop's probability averaged over ``samples`` noise draws;
        last             the last loop's log-probability averaged over draws (one draw: the biased readout);
        elbo             minus the K-step diffusion ELBO (a bound: never above the true log p);
        elbo_continuous  minus the continuous-time ELBO (independent of K)."""
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


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, num_loops: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, use_cache: bool = True) -> list[int]:
    """Sample ``max_new_tokens`` after ``prompt``; returns the new token ids.

    With the cache, each new token costs one clean-stream step plus ``num_loops``
    noisy-stream steps against ONE cache of clean keys/values per layer (its size
    does not depend on num_loops). Without it, the clean stream is recomputed over
    the whole window each token: same tokens, slower (a test checks they agree).
    When the window fills, it slides: the last half is re-encoded.
    """
    if not prompt:
        raise ValueError("generation needs a non-empty prompt (the model predicts the token after each position)")
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    window = model.config.context
    tokens = list(prompt)
    start = max(0, len(tokens) - window)
    context = model.encode(torch.tensor([tokens[start:]], device=device)) if use_cache else None
    new_tokens = []
    for _ in range(max_new_tokens):
        if not use_cache:
            context = model.encode(torch.tensor([tokens[start:]], device=device))
        z = initial_noise(model, (1, 1, model.config.d_model), num_loops, generator, device)
        logits = loop_logits(model, context, z, num_loops, generator)[0, -1]
        token = _choose(logits, temperature, top_k, generator)
        tokens.append(token)
        new_tokens.append(token)
        if len(tokens) - start > window:  # slide the window: keep the last half
            start = len(tokens) - window // 2
            if use_cache:
                context = model.encode(torch.tensor([tokens[start:]], device=device))
        elif use_cache:
            context = model.encode(torch.tensor([[token]], device=device), cache=context)
    return new_tokens


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of the sequences (1 = no repetition)."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def sample_quality(model, judge, prompt: list[int], num_loops: int, num_samples: int = 16, length: int = 64,
                   seed: int = 0, temperature: float = 1.0) -> dict:
    """Generative perplexity of ``num_samples`` K-loop samples under a reference ``judge``
    model (exp of its mean NLL per generated token), and distinct-2/3 of the samples."""
    samples = [generate(model, prompt, length, num_loops, temperature=temperature, seed=seed + index)
               for index in range(num_samples)]
    device = next(judge.parameters()).device
    window = judge.config.context
    total_nats, total_tokens = 0.0, 0
    for sample in samples:
        sequence = torch.tensor([(prompt + sample)[-(window + 1):]], device=device)
        logprobs = next_token_logprobs(judge, sequence, 1, torch.Generator().manual_seed(seed))
        scored = logprobs[0, -len(sample):] if len(sample) <= logprobs.shape[1] else logprobs[0]
        total_nats -= scored.sum().item()
        total_tokens += scored.numel()
    return {"gen_ppl": math.exp(total_nats / max(1, total_tokens)), "distinct2": distinct_n(samples, 2),
            "distinct3": distinct_n(samples, 3), "samples": num_samples, "length": length}


# -- per-row noise and whole distributions (used by loopdb.harness, the lm-eval adapter) --------------
@torch.no_grad()
def predictive_distribution(model, inputs: torch.Tensor, num_loops: int, samples: int,
                            generators: list, lengths: list | None = None) -> torch.Tensor:
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
    whose objective draws no noise (initial state None) is evaluated once.
    """
    batch, length = inputs.shape
    lengths = [length] * batch if lengths is None else [int(n) for n in lengths]
    if len(generators) != batch or len(lengths) != batch:
        raise ValueError(f"need one generator and one length per row: {batch} rows, "
                         f"{len(generators)} generators, {len(lengths)} lengths")
    if batch == 1:
        return _predictive_rows(model, inputs, num_loops, samples, generators, lengths, generators[0])
    states = [generator.get_state() for generator in generators]
    probe = torch.Generator().manual_seed(0)
    unused = probe.get_state()
    result = _predictive_rows(model, inputs, num_loops, samples, generators, lengths, probe)
    if torch.equal(probe.get_state(), unused):
        return result
    for generator, state in zip(generators, states):  # the loop draws: one row at a time instead
        generator.set_state(state)
    for row, (generator, n) in enumerate(zip(generators, lengths)):
        result[row, :n] = _predictive_rows(model, inputs[row:row + 1, :n], num_loops, samples, [generator], [n],
                                           generator)[0]
    return result


def _predictive_rows(model, inputs, num_loops, samples, generators, lengths, loop_generator) -> torch.Tensor:
    batch, length = inputs.shape
    context = model.encode(inputs)
    width = model.config.d_model
    total = None
    for _ in range(samples):
        rows = [initial_noise(model, (1, n, width), num_loops, generator, inputs.device)
                for generator, n in zip(generators, lengths)]
        z = None
        if rows[0] is not None:
            z = torch.zeros(batch, length, width, dtype=rows[0].dtype, device=inputs.device)
            for index, (row, n) in enumerate(zip(rows, lengths)):
                z[index, :n] = row[0]
        draw = torch.log_softmax(loop_logits(model, context, z, num_loops, loop_generator).float(), dim=-1)
        if z is None:  # deterministic: every draw would be the same
            return draw
        total = draw if total is None else torch.logaddexp(total, draw)  # running log-sum: one (B, T, V) kept
    return total - math.log(samples)
