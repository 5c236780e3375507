"""Readouts of a looped diffusion LM (docs/method.md#scoring): predictive, last, and the diffusion ELBO."""

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_model
from loopdb.readouts import scoring as engine
from loopdb.maths.edm import NoiseSchedule, sigma_grid
from loopdb.maths.elbo import continuous_elbo, discrete_elbo, exact_denoiser, prior_kl

SCHEDULE = NoiseSchedule()


@pytest.fixture(scope="module")
def toy():
    """Six unit vectors in 4 dimensions with a skewed prior: the exact denoiser is known."""
    generator = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    log_prior = torch.log_softmax(torch.randn(6, generator=generator), -1)
    tokens = torch.multinomial(log_prior.exp(), 4000, replacement=True, generator=generator)
    entropy = -log_prior[tokens].mean().item()
    return table, log_prior, tokens, entropy


def bound(denoise, table, tokens, grid, seed=1):
    return discrete_elbo(denoise, table[tokens], tokens, grid, 0.5, torch.Generator().manual_seed(seed)).mean().item()


def test_one_step_bound_is_the_cross_entropy_from_pure_noise(toy):
    table, log_prior, tokens, entropy = toy
    oracle = exact_denoiser(table, log_prior)
    # at sigma_max the oracle's posterior is the prior: the bound is the entropy (+ a negligible prior KL)
    assert bound(oracle, table, tokens, [80.0]) == pytest.approx(entropy, rel=1e-3)


def test_oracle_bound_is_near_the_truth_and_far_below_a_random_model(toy):
    table, log_prior, tokens, entropy = toy
    oracle = exact_denoiser(table, log_prior)
    generator = torch.Generator().manual_seed(3)

    def random_model(z, sigma):
        logits = torch.randn(*z.shape[:-1], len(table), generator=generator)
        return F.softmax(logits, -1) @ table, logits

    grid = sigma_grid(256, SCHEDULE)
    oracle_bound = bound(oracle, table, tokens, grid)
    assert entropy * 0.99 < oracle_bound < entropy * 1.05  # a bound: never (beyond noise) below the truth
    assert bound(random_model, table, tokens, grid) > 100 * oracle_bound


def test_discrete_bound_approaches_the_continuous_one(toy):
    table, log_prior, tokens, _ = toy
    oracle = exact_denoiser(table, log_prior)
    continuous = continuous_elbo(oracle, table[tokens], tokens, 0.002, 80.0, 0.5, 256,
                                 torch.Generator().manual_seed(1)).mean().item()
    gaps = [abs(bound(oracle, table, tokens, sigma_grid(k, SCHEDULE)) - continuous) for k in (16, 64, 256)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.03 * continuous


def test_prior_kl_is_zero_when_the_prior_matches():
    y = torch.zeros(3, 8)
    assert torch.allclose(prior_kl(y, 80.0, 0.0), torch.zeros(3), atol=1e-6)
    assert (prior_kl(torch.ones(3, 8), 1.0, 0.5) > 0).all()


def test_predictive_with_one_draw_is_the_single_draw_score(model=None):
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    single = engine.next_token_logprobs(model, x, 3, torch.Generator().manual_seed(4))
    for readout in ("predictive", "last"):
        assert torch.allclose(engine.token_logprobs(model, x, 3, readout, 1, torch.Generator().manual_seed(4)), single)
    # with more draws, averaging probabilities beats averaging log-probabilities (Jensen)
    predictive = engine.token_logprobs(model, x, 3, "predictive", 4, torch.Generator().manual_seed(4))
    last = engine.token_logprobs(model, x, 3, "last", 4, torch.Generator().manual_seed(4))
    assert (predictive >= last - 1e-6).all()


def test_elbo_readouts_run_on_a_model_and_refuse_other_objectives():
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for readout in ("elbo", "elbo_continuous"):
        values = engine.token_logprobs(model, x, 4, readout, 1, torch.Generator().manual_seed(0))
        assert values.shape == (2, 8) and torch.isfinite(values).all() and (values <= 0).all()
    # one loop: the ELBO is the one-draw cross-entropy from pure noise plus the prior KL
    elbo_one = engine.token_logprobs(model, x, 1, "elbo", 1, torch.Generator().manual_seed(0))
    predictive_one = engine.token_logprobs(model, x, 1, "predictive", 1, torch.Generator().manual_seed(0))
    assert torch.allclose(elbo_one, predictive_one, atol=0.05)
    model.loop = "dense"
    with pytest.raises(ValueError, match="need a diffusion model"):
        engine.token_logprobs(model, x, 2, "elbo", 1, torch.Generator())
    with pytest.raises(ValueError, match="unknown readout"):
        engine.token_logprobs(model, x, 2, "best", 1, torch.Generator())


def test_an_exact_denoiser_gains_nothing_from_more_loops_on_the_predictive_readout(toy):
    """Why more loops cannot lower the predictive readout of ONE next token: averaging the last step's
    posterior over the sampler's states gives back the distribution the first step (K=1, pure noise)
    already had, the tower property. An exact denoiser only gets there as K grows: at small K the
    Euler steps' discretization error makes it worse, the more so the lower the grid ends."""
    from loopdb.maths.sampler import run_sampler

    table, log_prior, _, _ = toy
    oracle = exact_denoiser(table, log_prior)
    z = SCHEDULE.sigma_max * torch.randn(20000, 4, generator=torch.Generator().manual_seed(5))

    def readout(num_loops, sigma_last):  # (distance of the predictive distribution from the prior, sharpness)
        probs = F.softmax(run_sampler(oracle, z, sigma_grid(num_loops, SCHEDULE, sigma_last=sigma_last)), -1)
        return (probs.mean(0) - log_prior.exp()).abs().sum().item(), probs.max(-1).values.mean().item()

    assert readout(1, 1.0)[0] < 1e-3
    for num_loops in (4, 32):
        distance, sharpness = readout(num_loops, 1.0)
        assert distance < 0.015 and sharpness > 1.4 * readout(1, 1.0)[1]  # each draw commits, the mean does not
    errors = [readout(k, 0.1)[0] for k in (2, 8, 32)]
    assert errors[0] > 0.5 > errors[1] > errors[2]
