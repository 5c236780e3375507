"""Training objectives of the next-token LMs: each is only a loss,
``loss(model, batch, generator, step) -> (loss, stats)``, with its settings given at construction.
What K loops mean at inference is the sampler's (loopdb.sampling), which the diffusion rollout and
the recurrent objectives call for their grids and initial states.

- diffusion (DiffusionBlocks, docs/method.md#looped-lm): one sigma per sequence, ONE
  forward/backward pass, w(sigma) * CE(head(C(D)), x_{t+1}).
- bptt (Huginn, baseline 1): random initial state, r iterations of the core with a
  Poisson-log-normal r (mean r_bar), gradients through the last k only, CE at the
  final state.
- dense (baseline 2): the same layers applied once, next-token CE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..maths.edm import loss_weight
from ..names import IGNORE_INDEX, OBJECTIVES
from ..sampling import DIFFUSION, RECURRENT


def split_batch(batch):
    """(inputs, targets) of a batch: a text window (B, T+1) predicts its next tokens; a task batch
    ({"inputs", "targets"}, loopdb.tasks.training_arrays) gives its targets, IGNORE_INDEX where unscored."""
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"]
    return batch[:, :-1], batch[:, 1:]


def token_cross_entropy(logits, targets) -> torch.Tensor:
    """CE per position, (B, T); 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(targets.shape)


def _cross_entropy(logits, targets) -> torch.Tensor:
    """Per-sequence mean CE over the scored positions, (B,)."""
    scored = targets != IGNORE_INDEX
    if bool(scored.all()):  # every position scored (text): the plain mean
        return token_cross_entropy(logits, targets).mean(1)
    return token_cross_entropy(logits, targets).sum(1) / scored.sum(1).clamp(min=1)


def noised_targets(model, next_tokens, sigma, generator) -> torch.Tensor:
    """z_sigma = y + sigma * eps for the next tokens' target embeddings, (B, T, C); sigma: one per
    sequence (B,) or one per position (B, T)."""
    targets = model.targets(next_tokens.clamp(min=0))  # unscored positions (IGNORE_INDEX) get some target
    noise = torch.randn(targets.shape, generator=generator).to(targets.device, targets.dtype)
    return targets + sigma.view(sigma.shape[0], -1, 1) * noise


def mean_cross_entropy(logits, targets) -> torch.Tensor:
    """The mean over sequences of ``_cross_entropy``. With every position scored (text) that is the
    mean over all tokens: one fused reduction, without a per-position loss and its backward."""
    if bool((targets != IGNORE_INDEX).all()):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return _cross_entropy(logits, targets).mean()


def weighted_cross_entropy(model, logits, next_tokens, sigma):
    """w(sigma) * CE(logits, next token), one sigma per sequence (docs/method.md#edm); returns (loss, stats)."""
    diffusion = model.diffusion
    cross_entropy = _cross_entropy(logits, next_tokens)  # one value per sequence, i.e. per sigma
    weight = loss_weight(sigma, model.sigma_data, diffusion.loss_weight, diffusion.loss_weight_clamp or None)
    loss = (weight * cross_entropy).mean()
    return loss, {"ce": cross_entropy.mean().detach(), "weight": weight.mean().detach()}


GRID_SIZES = (1, 2, 4, 8, 16)  # inference grids whose sigmas train_grid_fraction covers


class DiffusionObjective:
    """DiffusionBlocks for the looped LM, with the remedies of docs/method.md#scoring as config keys
    (``model.diffusion``); with every remedy off it is exactly the plain method."""

    def loss(self, model, tokens: torch.Tensor, generator: torch.Generator, step: int = 0):
        """tokens: (B, T+1). All randomness comes from ``generator`` (CPU), so a step is reproducible."""
        diffusion = model.diffusion
        inputs, next_tokens = split_batch(tokens)
        sigma = self.training_sigmas(model, inputs.shape[0], generator).to(inputs.device)
        noisy = noised_targets(model, next_tokens, sigma, generator)
        stats = {}
        if diffusion.rollout_fraction > 0 and _chance(generator) < diffusion.rollout_fraction:
            noisy, sigma = self.rollout(model, inputs, generator)
            stats["rollout_sigma"] = sigma[0].detach()
        previous = None
        if diffusion.self_condition and _chance(generator) < 0.5:
            with torch.no_grad():  # the first pass only provides the estimate to condition on
                previous = model.soft_denoised(model.denoise(noisy, sigma, model.encode(inputs))).to(noisy.dtype)
        loss, loss_stats = weighted_cross_entropy(model, model(inputs, noisy, sigma, previous), next_tokens, sigma)
        return loss, {**loss_stats, **stats}

    def training_sigmas(self, model, batch: int, generator) -> torch.Tensor:
        """One sigma per sequence from the truncated log-normal; with train_grid_fraction,
        that share of sequences takes a sigma of an inference grid instead (sigma_max included)."""
        sigma = model.schedule.sample_sigmas(batch, generator)
        fraction = model.diffusion.train_grid_fraction
        if fraction > 0:
            on_grid = torch.rand(batch, generator=generator) < fraction
            for row in torch.nonzero(on_grid).flatten().tolist():
                grid = DIFFUSION.grid(model, GRID_SIZES[int(torch.randint(len(GRID_SIZES), (1,), generator=generator))])
                sigma[row] = grid[int(torch.randint(len(grid), (1,), generator=generator))]
        return sigma

    @torch.no_grad()
    def rollout(self, model, inputs, generator):
        """Run k sampler steps (no gradient) from pure noise on the rollout grid, k drawn here, and return
        the state reached and its sigma: the graded pass then sees what inference feeds it."""
        diffusion = model.diffusion
        last = diffusion.rollout_loops - 1  # a K-step grid has K sigmas
        most = last if diffusion.rollout_max_steps == 0 else min(diffusion.rollout_max_steps, last)
        steps = 1 + int(torch.randint(most, (1,), generator=generator))
        state, sigma = DIFFUSION.rollout(model, model.encode(inputs), (*inputs.shape, model.config.d_model),
                                         diffusion.rollout_loops, steps, generator, inputs.device)
        return state, torch.full((inputs.shape[0],), sigma, device=inputs.device)


def _chance(generator) -> float:
    return float(torch.rand(1, generator=generator))


class StackedDiffusionObjective(DiffusionObjective):
    """DiffusionBlocks for the stacked LM: each step trains one block, drawn uniformly from
    ``train_blocks`` (default all) with the step's generator; sigma per sequence from that
    block's range. Inference is the looped model's sampler (loopdb.sampling.DiffusionSampler)."""

    def __init__(self, train_blocks: tuple = ()):
        self.train_blocks = tuple(train_blocks)

    def choose_block(self, model, generator: torch.Generator) -> int:
        blocks = self.train_blocks or tuple(range(len(model.blocks)))
        return blocks[int(torch.randint(len(blocks), (1,), generator=generator))]

    def loss(self, model, tokens: torch.Tensor, generator: torch.Generator, step: int = 0):
        inputs, next_tokens = split_batch(tokens)
        block_index = self.choose_block(model, generator)
        lo, hi = model.block_range(block_index)
        sigma = model.schedule.sample_sigmas(inputs.shape[0], generator, lo, hi).to(inputs.device)
        noisy = noised_targets(model, next_tokens, sigma, generator)
        loss, stats = weighted_cross_entropy(model, model(inputs, noisy, sigma, block_index), next_tokens, sigma)
        return loss, {**stats, "block": torch.tensor(float(block_index))}


# -- BPTT (Huginn) ---------------------------------------------------------------------------------
def sample_depth(kind: str, mean_depth: int, generator: torch.Generator) -> int:
    """Number of recurrent iterations for one training step.

    poisson_lognormal (Huginn): tau ~ N(ln(r_bar - 1) - s^2/2, s), s = 1/2;
    r = 1 + Poisson(e^tau), so E[r] = r_bar and r >= 1. fixed: r = r_bar.
    uniform: r ~ U{1, ..., 2 r_bar - 1} (mean r_bar).
    """
    if kind == "fixed" or mean_depth <= 1:
        return max(1, mean_depth)
    if kind == "uniform":
        return int(torch.randint(1, 2 * mean_depth, (1,), generator=generator))
    if kind != "poisson_lognormal":
        raise ValueError(f"unknown depth sampler {kind!r}; choose poisson_lognormal, fixed or uniform")
    spread = 0.5
    tau = torch.randn(1, generator=generator, dtype=torch.float64) * spread + math.log(mean_depth - 1) - spread**2 / 2
    return 1 + int(torch.poisson(tau.exp(), generator=generator))


class BPTTObjective:
    def __init__(self, mean_depth: int = 32, backprop_depth: int = 8, depth_sampler: str = "poisson_lognormal"):
        self.mean_depth, self.backprop_depth, self.depth_sampler = mean_depth, backprop_depth, depth_sampler

    def loss(self, model, tokens, generator, step: int = 0):
        inputs, next_tokens = split_batch(tokens)
        depth = sample_depth(self.depth_sampler, self.mean_depth, generator)
        context = model.encode(inputs)
        state = RECURRENT.initial_state(model, (*inputs.shape, model.config.d_model), depth, generator,
                                        inputs.device)
        state = self.iterate(model, context, state, depth)
        cross_entropy = mean_cross_entropy(model.readout(state, context), next_tokens)
        return cross_entropy, {"ce": cross_entropy.detach(), "depth": torch.tensor(float(depth))}

    def iterate(self, model, context, state, depth: int):
        """``depth`` iterations; only the last ``backprop_depth`` are differentiated (truncated BPTT)."""
        no_grad_steps = max(0, depth - self.backprop_depth)
        with torch.no_grad():
            for _ in range(no_grad_steps):
                state = model.recur(state, context)
        for _ in range(depth - no_grad_steps):
            state = model.recur(state, context)
        return state


def exit_distribution(exit_probabilities: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ouro's p(t) = lambda_t * prod_{j<t} (1 - lambda_j) for t < T, and the rest of the mass at the
    last loop T: sums to 1 at every position. ``exit_probabilities``: lambda_1..lambda_T, each (B, T)."""
    survival = torch.ones_like(exit_probabilities[0])
    distribution = []
    for loop, exit_probability in enumerate(exit_probabilities):
        last = loop == len(exit_probabilities) - 1
        distribution.append(survival if last else survival * exit_probability)
        survival = survival * (1 - exit_probability)
    return distribution


class OuroObjective(BPTTObjective):
    """Ouro (Stage I): unroll ``max_loops`` loops with gradients through all of them; the LM loss after
    every loop, weighted by the learned exit distribution p(t) (``exit_distribution`` of the model's
    gate), minus ``exit_entropy`` x its entropy, which keeps the gate from collapsing on one depth.
    K loops at inference = K iterations from a random state, as for BPTT (loopdb.sampling)."""

    def __init__(self, max_loops: int = 8, exit_entropy: float = 0.05):
        self.max_loops, self.exit_entropy = max_loops, exit_entropy

    def loss(self, model, tokens, generator, step: int = 0):
        inputs, targets = split_batch(tokens)
        context = model.encode(inputs)
        state = RECURRENT.initial_state(model, (*inputs.shape, model.config.d_model), self.max_loops, generator,
                                        inputs.device)
        losses, gates = [], []
        for _ in range(self.max_loops):
            state = model.recur(state, context)
            losses.append(token_cross_entropy(model.readout(state, context), targets))
            gates.append(model.exit_probability(state))
        distribution = exit_distribution(gates)
        expected = sum(p * loss for p, loss in zip(distribution, losses))
        entropy = -sum(p * torch.log(p.clamp(min=1e-12)) for p in distribution)
        scored = (targets != IGNORE_INDEX).float()
        loss = ((expected - self.exit_entropy * entropy) * scored).sum() / scored.sum().clamp(min=1)
        mean_exit = sum((loop + 1) * p for loop, p in enumerate(distribution))
        return loss, {"ce": (losses[-1] * scored).sum().detach() / scored.sum().clamp(min=1),
                      "mean_exit": (mean_exit * scored).sum().detach() / scored.sum().clamp(min=1)}


class DenseObjective:
    def loss(self, model, tokens, generator, step: int = 0):
        inputs, next_tokens = split_batch(tokens)
        cross_entropy = mean_cross_entropy(model.dense_logits(model.encode(inputs)), next_tokens)
        return cross_entropy, {"ce": cross_entropy.detach()}


def make_objective(train_config) -> "DiffusionObjective | BPTTObjective | OuroObjective | DenseObjective":
    name = train_config.objective
    if name == "diffusion":
        return DiffusionObjective()
    if name == "bptt":
        return BPTTObjective(train_config.mean_depth, train_config.backprop_depth, train_config.depth_sampler)
    if name == "ouro":
        return OuroObjective(train_config.max_loops, train_config.exit_entropy)
    if name == "dense":
        return DenseObjective()
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


def diffusion_blocks_loss(model, tokens, generator):
    """The DiffusionBlocks loss of docs/method.md#looped-lm (kept as a function for direct use)."""
    return DiffusionObjective().loss(model, tokens, generator)
