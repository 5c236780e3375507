"""Quality of generated text: generative perplexity under a judge model, MAUVE (Pillutla et al. 2021)
on the judge's features against held-out text, and distinct-n."""

from __future__ import annotations

import math

import torch

from .generation import generate_batch
from .scoring import next_token_logprobs


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of the sequences (1 = no repetition)."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def sample_quality(model, judge, prompt: list[int], num_loops: int, num_samples: int = 16, length: int = 64,
                   seed: int = 0, temperature: float = 1.0, reference: torch.Tensor | None = None) -> dict:
    """Generative perplexity of ``num_samples`` K-loop samples under a reference ``judge``
    model (exp of its mean NLL per generated token), and distinct-2/3 of the samples; with
    ``reference`` (judge_features of held-out texts) also their MAUVE against it. The samples are drawn
    as one batch (loopdb.readouts.generation.generate_batch), sample i from seed ``seed + i``."""
    samples = generate_batch(model, [prompt] * num_samples, length, num_loops, temperature=temperature,
                             seeds=[seed + index for index in range(num_samples)])
    quality = {"gen_ppl": judge_perplexity(judge, prompt, samples, seed), "distinct2": distinct_n(samples, 2),
               "distinct3": distinct_n(samples, 3), "samples": num_samples, "length": length}
    if reference is not None:
        quality["mauve"] = mauve_score(judge_features(judge, samples), reference, seed)
    return quality


MAUVE_FEATURES = ("judge: final-norm hidden state at each position times the output embedding of the token "
                  "after it, mean over positions")  # what judge_features returns, named in study results


@torch.no_grad()
def judge_features(judge, texts: list[list[int]]) -> torch.Tensor:
    """(N, d) MAUVE features that see word order: over the positions t of a text, the mean of the judge's
    hidden state at t after its last layer and final norm (what its head reads) times, coordinate by
    coordinate, the output embedding of the token at t + 1. Each prediction is paired with the token
    that came, so the coordinates sum to the judge's mean logit of the actual next tokens, and a text's
    own tokens in another order give other features. The judge is a dense run (its clean stream is the
    model).

    Why not the reference implementation's state at the last token, or the states' mean: on the
    small judges trained here the last token's state is mostly that token's identity (texts against
    uniform random tokens: MAUVE 0.81), and the mean keeps mostly which tokens a text holds (text
    against its own tokens shuffled: 0.99); these features score held-out text about 1 and both
    near 0 (docs/results/recurrent-depth-text.md, tests/test_mauve.py)."""
    if getattr(judge, "loop", None) != "dense" or not hasattr(judge, "final_norm"):
        raise ValueError("MAUVE features come from a dense judge (objective=dense)")
    if any(len(text) < 2 for text in texts):
        raise ValueError("MAUVE features pair each position with the token after it: give texts of 2 tokens or more")
    device = next(judge.parameters()).device
    output_embedding = judge.embedding.weight if judge.head is None else judge.head.weight  # (V, d)
    rows = []
    for text in texts:
        tokens = torch.tensor([text[-judge.config.context:]], device=device)
        states = judge.final_norm(judge.encode(tokens).final_hidden)[0, :-1].float()
        rows.append((states * output_embedding[tokens[0, 1:]].float()).mean(0))
    return torch.stack(rows).cpu()


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


def mauve_score(p_features: torch.Tensor, q_features: torch.Tensor, seed: int = 0) -> float:
    """MAUVE between two sets of features: the ``mauve-text`` package quantises them (PCA, k-means into
    n/10 buckets) and traces the divergence frontier; 1 = the same distribution, near 0 = told apart.

    The area is taken along the frontier in its own order (mixture weight 0 -> 1, from (1, 0) to (0, 1)).
    The package sorts the points by each coordinate instead, and where the histograms are equal every
    point ties at (1, 1) up to rounding, so its score of a set against itself came out anywhere in
    [0.5, 1]; on a frontier without ties both areas agree (tests/test_mauve.py)."""
    try:
        import mauve
    except ImportError:
        raise ImportError("MAUVE needs the mauve extra: pip install 'loopdb[mauve]'") from None
    result = mauve.compute_mauve(p_features=p_features.double().numpy(), q_features=q_features.double().numpy(),
                                 seed=seed, verbose=False)
    return frontier_area(result.divergence_curve)


def frontier_area(curve) -> float:
    """Area under a divergence frontier given as points (x, y) in mixture-weight order (trapezoids)."""
    x, y = torch.as_tensor(curve, dtype=torch.float64).T
    return float(((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2).sum())
