"""Quality of generated text: generative perplexity under a judge model, and distinct-n."""

from __future__ import annotations

import math

import torch

from .generation import generate
from .scoring import next_token_logprobs


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
    return {"gen_ppl": judge_perplexity(judge, prompt, samples, seed), "distinct2": distinct_n(samples, 2),
            "distinct3": distinct_n(samples, 3), "samples": num_samples, "length": length}


@torch.no_grad()
def judge_perplexity(judge, prompt: list[int], samples: list[list[int]], seed: int = 0, sampler=None) -> float:
    """exp of the ``judge``'s mean NLL per generated token of ``samples``, each after ``prompt``, read
    at one loop by ``sampler`` (default: the judge's own, loopdb.sampling)."""
    device = next(judge.parameters()).device
    window = judge.config.context
    total_nats, total_tokens = 0.0, 0
    for sample in samples:
        sequence = torch.tensor([(prompt + sample)[-(window + 1):]], device=device)
        logprobs = next_token_logprobs(judge, sequence, 1, torch.Generator().manual_seed(seed), sampler)
        scored = logprobs[0, -len(sample):] if len(sample) <= logprobs.shape[1] else logprobs[0]
        total_nats -= scored.sum().item()
        total_tokens += scored.numel()
    return math.exp(total_nats / max(1, total_tokens))
