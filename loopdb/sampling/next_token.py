"""Samplers of the next-token language models: what K loops of a trained network are.

The model's ``loop`` setting (fixed when the family builds it from the run's config) names its
sampler; ``sampler_of(model)`` looks it up. A sampler holds no weights and no state: its
settings are the model's (``model.diffusion``), so one instance serves every model.

- diffusion (DiffusionBlocks, docs/method.md#looped-lm): K loops = K steps of the ODE solver on a sigma grid
  computed from K (never stored), from the marginal at the top of the grid. With draft width
  L > 1 each step denoises the L slots of every position together and the logits are slot 0's.
- recurrent (Huginn, Ouro): K iterations of the core from a random state, then the coda.
- dense: the layers once on the clean stream; K is ignored and no noise is drawn.
- joint (sequence-joint DiffusionBlocks): K solver steps with a sigma per position, one sigma for
  all or a wavefront across positions (loopdb.maths.schedules).

Every sampler answers ``initial_state(model, shape, K, generator, device)`` (None: no state),
``final_logits(model, context, z, K, generator)`` and ``has_loops``.
"""

from __future__ import annotations

import torch

from ..maths.edm import initial_state as edm_initial_state
from ..maths.edm import grid_curve, sigma_grid
from ..maths.schedules import position_sigmas
from ..maths.sampler import run_sampler


def _default_generator(generator):
    return generator if generator is not None else torch.Generator().manual_seed(0)


class DiffusionSampler:
    """K loops = K sampler steps of the model's denoiser on ``grid(model, K)``.

    A grid is a sequence of K noise levels walked in order; ``run_grid`` hands each entry to the
    denoiser and the solver as it is, so an entry may also be a tensor of per-position sigmas
    (broadcast against the state) without changing the solver."""

    has_loops = True

    def grid(self, model, num_loops: int) -> list[float]:
        diffusion = model.diffusion
        return sigma_grid(num_loops, model.schedule, diffusion.grid, diffusion.grid_sigma_last or None)

    def initial_state(self, model, shape, num_loops: int, generator, device):
        """The marginal at the top of the grid; (B, T, C), or (B, T, L, C) for a drafting model."""
        if model.draft_width > 1:
            shape = (*shape[:-1], model.draft_width, shape[-1])
        return edm_initial_state(shape, self.grid(model, num_loops)[0], model.sigma_data, generator, device)

    def estimate(self, model, logits, generator) -> torch.Tensor:
        """Dhat from logits: the mean of the target table under softmax (soft), or one row of it."""
        kind = model.diffusion.estimate
        if kind == "soft":
            return model.soft_denoised(logits)
        if kind == "argmax":
            choice = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float(), -1)
            choice = torch.multinomial(probs.flatten(0, -2).cpu(), 1, generator=generator).view(probs.shape[:-1])
        return model.target_table()[choice.to(logits.device)]

    def run_grid(self, model, context, z, grid, generator=None, final_evaluation=True, denoise=None):
        """The solver on ``grid`` from z; returns the last logits (or, with ``final_evaluation=False``,
        the state reached: a rollout). ``denoise(state, sigma, previous) -> logits`` defaults to the
        model's one-slot denoiser with self-conditioning on the previous step's Dhat."""
        generator = _default_generator(generator)
        if denoise is None:
            denoise = lambda state, sigma, previous: model.denoise(state, sigma, context, previous)  # noqa: E731
        carried = {"previous": None}  # self-conditioning: the previous step's Dhat

        def step(state, sigma):
            logits = denoise(state, sigma, carried["previous"])
            denoised = self.estimate(model, logits, generator).to(state.dtype)
            carried["previous"] = denoised
            return denoised, logits

        return run_sampler(step, z, grid, model.diffusion.solver,
                           noise=lambda shape: torch.randn(shape, generator=generator),
                           final_evaluation=final_evaluation)

    def rollout(self, model, context, shape, num_loops: int, steps: int, generator, device):
        """The state the sampler reaches after ``steps`` steps of the ``num_loops``-step grid from a fresh
        initial state (no evaluation there), and the sigma it sits at."""
        grid = self.grid(model, num_loops)
        z = self.initial_state(model, shape, num_loops, generator, device)
        return self.run_grid(model, context, z, grid[:steps + 1], generator, final_evaluation=False), grid[steps]

    def final_logits(self, model, context, z, num_loops: int, generator=None):
        grid = self.grid(model, num_loops)
        if model.draft_width == 1:
            return self.run_grid(model, context, z, grid, generator)
        # every step denoises the L slots of each position jointly; the next token is slot 0
        logits = self.run_grid(model, context, z, grid, generator,
                               denoise=lambda state, sigma, previous: model.denoise_draft(state, sigma, context))
        return logits[:, :, 0]


class RecurrentSampler:
    """K iterations of the core (``model.recur``) from a random state, then the coda."""

    has_loops = True

    def initial_state(self, model, shape, num_loops: int, generator, device):
        # Huginn starts from a random state (std ``state_std``); the recurrence normalises it after one step
        return (torch.randn(shape, generator=generator) * model.config.state_std).to(device)

    def final_logits(self, model, context, z, num_loops: int, generator=None):
        for _ in range(num_loops):
            z = model.recur(z, context)
        return model.readout(z, context)

    def position_states(self, model, seed: int, start: int, count: int, device) -> torch.Tensor:
        """(1, count, width) random initial states (std ``state_std``) of positions start..start+count-1,
        each drawn from its own generator seeded by (seed, position): a position starts the same whether
        it is decoded with a cache or recomputed, so cached and uncached generation agree."""
        width = model.config.d_model
        rows = [torch.randn(width, generator=torch.Generator().manual_seed((seed * 1_000_003 + position) % 2**63))
                for position in range(start, start + count)]
        return (torch.stack(rows)[None] * model.config.state_std).to(device)


class DenseSampler:
    """The layers once on the clean stream (``model.dense_logits``): no state, no noise, K ignored."""

    has_loops = False  # every loop count gives the same logits: score it at K = 1

    def initial_state(self, model, shape, num_loops: int, generator, device):
        return None

    def final_logits(self, model, context, z, num_loops: int, generator=None):
        return model.dense_logits(context)[:, -(context.length if z is None else z.shape[1]):]


class JointSampler(DiffusionSampler):
    """Sequence-joint DiffusionBlocks (loopdb.models.joint): K solver steps from sigma_max with a sigma
    per position. The grid is (K, T): the model's grid curve walked with the wavefront width
    (loopdb.maths.schedules; width 0: every position on the same grid), handed to the solver one
    (T, 1) row per step."""

    def grid(self, model, num_loops: int, length: int = 1) -> torch.Tensor:
        diffusion = model.diffusion
        curve = grid_curve(model.schedule, diffusion.grid, model.sigma_last)
        return position_sigmas(num_loops, length, curve, model.schedule.sigma_max, model.sigma_last,
                               diffusion.wavefront)

    def initial_state(self, model, shape, num_loops: int, generator, device):
        return edm_initial_state(shape, model.schedule.sigma_max, model.sigma_data, generator, device)

    def final_logits(self, model, context, z, num_loops: int, generator=None):
        rows = self.grid(model, num_loops, z.shape[1]).to(z.device)[..., None]  # (K, T, 1)
        return self.run_grid(model, context, z, list(rows), generator,
                             denoise=lambda state, sigma, previous: model.denoise(state, sigma.view(1, -1), context))


DIFFUSION, RECURRENT, DENSE, JOINT = DiffusionSampler(), RecurrentSampler(), DenseSampler(), JointSampler()
SAMPLERS = {"diffusion": DIFFUSION, "recurrent": RECURRENT, "dense": DENSE,  # the values of a model's ``loop``
            "joint": JOINT}
# the ``loop`` of a next-token model trained with each objective (the family sets it from the run's config)
OBJECTIVE_LOOPS = {"diffusion": "diffusion", "bptt": "recurrent", "ouro": "recurrent", "dense": "dense"}


def sampler_of(model):
    """The sampler the model's ``loop`` setting names."""
    return SAMPLERS[model.loop]


def anchor_sampler(model) -> DenseSampler:
    """The dense readout of a model trained with one: a dense model's own, or the anchor head of a
    DiffusionBlocks model trained with anchor_weight > 0 (the clean stream's next-token logits)."""
    if model.loop != "dense" and not model.anchor_head:
        raise ValueError("this model has no trained anchor head: train it with anchor_weight > 0 "
                         "(e.g. --preset demo-draft), or score it with readout=predictive")
    return DENSE
