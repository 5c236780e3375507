"""Samplers apart from losses (loopdb.sampling): models hold no objective, every sampler reads the
network it is given, and no module outside the sampling package walks a grid of its own."""

import re
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_model
from loopdb.config import preset
from loopdb.families import FAMILIES, build_model, family_of
from loopdb.maths.edm import euler_step, initial_state
from loopdb.maths.sampler import run_sampler
from loopdb.sampling import DENSE, DIFFUSION, OBJECTIVE_LOOPS, RECURRENT, SAMPLERS, sampler_of

ROOT = Path(__file__).resolve().parent.parent / "loopdb"


def tokens(batch=2, length=9, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def small(name: str, **overrides):
    config = preset(name)
    config.model.vocab_size = VOCAB
    config.model.d_model, config.model.n_heads = 32, 4
    for key, value in overrides.items():
        setattr(config.train, key, value)
    return config


@pytest.mark.parametrize("name,objective", [("tiny", "diffusion"), ("tiny", "bptt"), ("tiny", "ouro"),
                                            ("tiny", "dense"),
                                            ("tiny-draft", "diffusion"), ("tiny-stacked", "diffusion"),
                                            ("tiny-stacked", "dense"), ("tiny-mdm", "diffusion"), ("tiny-vit", "dense"),
                                            ("tiny-dit", "diffusion")])
def test_a_built_model_holds_no_objective_and_its_family_builds_the_loss(name, objective):
    config = small(name, objective=objective)
    model = build_model(config)
    assert not hasattr(model, "objective")
    loss = family_of(config).objective(config)
    assert callable(loss.loss) and not hasattr(loss, "final_logits") and not hasattr(loss, "grid")
    if family_of(config).commands == "text":  # a next-token model names its sampler
        assert sampler_of(model) is SAMPLERS[OBJECTIVE_LOOPS[objective]]


def test_every_family_declares_its_loss():
    assert all(callable(family.objective) for family in FAMILIES.values())


def test_the_stacked_dense_baseline_is_a_wiring_of_the_model():
    chained = build_model(small("tiny-stacked", objective="dense"))
    blockwise = build_model(small("tiny-stacked", objective="diffusion"))
    assert chained.chained and sampler_of(chained) is DENSE
    assert not blockwise.chained and sampler_of(blockwise) is DIFFUSION


def test_diffusion_with_one_loop_is_one_evaluation_at_sigma_max():
    model = tiny_model()
    x = tokens()
    context = model.encode(x)
    z = DIFFUSION.initial_state(model, (*x.shape, 32), 1, torch.Generator().manual_seed(0), "cpu")
    assert DIFFUSION.grid(model, 1) == [model.schedule.sigma_max]
    expected = model.denoise(z, model.schedule.sigma_max, context)
    assert torch.equal(DIFFUSION.final_logits(model, context, z, 1), expected)


def test_diffusion_with_four_loops_is_four_euler_steps_on_its_grid():
    model = tiny_model()
    x = tokens()
    context = model.encode(x)
    z = DIFFUSION.initial_state(model, (*x.shape, 32), 4, torch.Generator().manual_seed(1), "cpu")
    grid = DIFFUSION.grid(model, 4)
    assert len(grid) == 4 and grid == sorted(grid, reverse=True)
    state = z
    for sigma, sigma_next in zip(grid, grid[1:]):
        state = euler_step(state, model.soft_denoised(model.denoise(state, sigma, context)), sigma, sigma_next)
    expected = model.denoise(state, grid[-1], context)
    assert torch.allclose(DIFFUSION.final_logits(model, context, z, 4), expected, atol=1e-6)


def test_recurrent_loops_are_iterations_of_the_core_from_a_random_state():
    model = tiny_model()
    model.loop = "recurrent"
    x = tokens()
    context = model.encode(x)
    z = sampler_of(model).initial_state(model, (*x.shape, 32), 4, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(z, torch.randn((*x.shape, 32), generator=torch.Generator().manual_seed(2)))
    state = z
    for _ in range(4):
        state = model.recur(state, context)
    assert torch.equal(RECURRENT.final_logits(model, context, z, 4), model.readout(state, context))
    assert not torch.allclose(RECURRENT.final_logits(model, context, z, 1), model.readout(state, context))


def test_dense_draws_nothing_and_ignores_the_loop_count():
    model = tiny_model()
    model.loop = "dense"
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    assert DENSE.initial_state(model, (2, 8, 32), 4, generator, "cpu") is None
    assert torch.equal(generator.get_state(), before)
    context = model.encode(tokens())
    one, four = DENSE.final_logits(model, context, None, 1), DENSE.final_logits(model, context, None, 4)
    assert torch.equal(one, four) and torch.equal(one, model.dense_logits(context))


def test_a_grid_of_per_position_sigmas_walks_each_position_on_its_own_grid():
    """The solver hands grid entries through as they are: a (T, 1) tensor of sigmas per step walks
    position t on column t, exactly as a float grid walks it alone."""
    columns = [[80.0, 2.0, 0.1], [40.0, 1.0, 0.002]]
    z = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(4))

    def denoise(state, sigma):
        denoised = torch.tanh(state) * 0.5  # any function of the state
        return denoised, state

    per_position = [torch.tensor([[a], [b]]) for a, b in zip(*columns)]
    together = run_sampler(denoise, z, per_position, "euler", final_evaluation=False)
    for position, column in enumerate(columns):
        alone = run_sampler(denoise, z[:, position:position + 1], column, "euler", final_evaluation=False)
        torch.testing.assert_close(together[:, position:position + 1], alone)
    heun = run_sampler(denoise, z, per_position, "heun", final_evaluation=False)
    assert heun.shape == z.shape and torch.isfinite(heun).all()
    # the initial state at a per-position top of the grid: each position at its own scale, the same draws
    top = initial_state((1, 2, 4), per_position[0], 0.5, torch.Generator().manual_seed(5))
    for position, column in enumerate(columns):
        alone = initial_state((1, 2, 4), column[0], 0.5, torch.Generator().manual_seed(5))
        torch.testing.assert_close(top[:, position], alone[:, position])


def _sources(*folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_no_module_outside_the_sampling_package_walks_a_grid_or_draws_an_initial_state():
    # the samplers, the pure solver and grids they call, and the exported model code, which must stand
    # alone (torch and transformers only) and so carries its own copy of the sampler
    own = ("sampling/", "maths/", "export/hf_")
    pattern = re.compile(r"\brun_sampler\(|\bsigma_grid\(|\bedm_initial_state\(|maths\.edm import .*initial_state")
    offenders = [name for name, text in _sources(".") if not name.startswith(own) and pattern.search(text)]
    assert not offenders, offenders


def test_readouts_and_evaluation_never_ask_a_model_for_its_objective():
    # the run's config may name its objective (train.objective, t.objective); a model may not hold one
    pattern = re.compile(r"(?<!train)(?<!\bt)\.objective\b(?!\()|objective\.name|[gh]asattr\(model,|copy\.copy\(model")
    folders = ("readouts", "evaluation", "sampling", "models")
    offenders = [name for name, text in _sources(*folders) if pattern.search(text)]
    assert not offenders, offenders
