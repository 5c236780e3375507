"""Remedies for loops that do not pay (docs/method.md#scoring): each is a config key, each switched
off reproduces the plain model exactly, each switched on changes what it should."""

import math

import pytest
import torch

from conftest import VOCAB, record_denoise_calls, tiny_model
from loopdb.readouts import scoring as engine
from loopdb.objectives.next_token import GRID_SIZES, DiffusionObjective
from loopdb.sampling import DIFFUSION

OFF = {"target_norm": 1.0, "estimate": "soft", "train_grid_fraction": 0.0, "self_condition": False,
       "rollout_fraction": 0.0, "solver": "euler", "loss_weight": "unit"}
ON = {"target_norm": 0.0, "estimate": "argmax", "train_grid_fraction": 1.0, "self_condition": True,
      "rollout_fraction": 1.0, "solver": "ancestral", "loss_weight": "edm"}


def batch(seed=0):
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


def loss_and_rng(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    loss, _ = DiffusionObjective().loss(model, batch(), generator)
    return loss.item(), torch.rand(1, generator=generator).item()  # what the run draws next


def plain():
    return tiny_model(seed=2, sigma_data=0.5)  # sigma_data != 1/sqrt(d): target_norm=0 then matters


@pytest.mark.parametrize("key", sorted(OFF))
def test_switched_off_is_exactly_the_plain_model(key):
    reference = plain()
    switched_off = tiny_model(seed=2, sigma_data=0.5, **{key: OFF[key]})
    assert reference.state_dict().keys() == switched_off.state_dict().keys()
    assert loss_and_rng(reference) == loss_and_rng(switched_off)
    x = batch()
    for loops in (1, 4):
        a = engine.next_token_logprobs(reference, x, loops, torch.Generator().manual_seed(0))
        b = engine.next_token_logprobs(switched_off, x, loops, torch.Generator().manual_seed(0))
        assert torch.equal(a, b)


@pytest.mark.parametrize("key", sorted(ON))
def test_switched_on_changes_training_or_inference(key):
    reference, changed = plain(), tiny_model(seed=2, sigma_data=0.5, **{key: ON[key]})
    if key == "self_condition":  # its projection starts at zero: give it a value to show it is used
        torch.nn.init.normal_(changed.self_condition.weight, std=0.5)
    x = batch()
    same_loss = loss_and_rng(reference) == loss_and_rng(changed)
    same_logits = torch.equal(engine.next_token_logprobs(reference, x, 4, torch.Generator().manual_seed(0)),
                              engine.next_token_logprobs(changed, x, 4, torch.Generator().manual_seed(0)))
    assert not (same_loss and same_logits)


def test_target_norm_zero_matches_the_targets_to_sigma_data():
    model = tiny_model(sigma_data=0.5, target_norm=0.0)
    norms = model.target_table().norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 0.5 * math.sqrt(model.config.d_model)))
    logits = torch.zeros(1, 1, VOCAB)
    logits[0, 0, 3] = 50.0
    assert torch.allclose(model.soft_denoised(logits)[0, 0], model.target_table()[3], atol=1e-4)


def test_grid_fraction_one_trains_only_at_inference_grid_sigmas():
    model = tiny_model(train_grid_fraction=1.0)
    objective = DiffusionObjective()
    sigmas = objective.training_sigmas(model, 400, torch.Generator().manual_seed(0)).tolist()
    allowed = {round(s, 6) for k in GRID_SIZES for s in DIFFUSION.grid(model, k)}
    assert {round(s, 6) for s in sigmas} <= allowed
    assert max(sigmas) == pytest.approx(80.0)  # sigma_max, where K = 1 reads out, is trained


def test_rollout_returns_a_detached_sampler_state_at_a_grid_sigma():
    model = tiny_model(rollout_fraction=1.0, rollout_loops=6)
    objective = DiffusionObjective()
    inputs = batch()[:, :-1]
    state, sigma = objective.rollout(model, inputs, torch.Generator().manual_seed(0))
    grid = DIFFUSION.grid(model, 6)
    assert not state.requires_grad and state.shape == (3, 10, model.config.d_model)
    assert sigma[0].item() in [pytest.approx(s) for s in grid[1:]] and (sigma == sigma[0]).all()
    loss, stats = objective.loss(model.train(), batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert "rollout_sigma" in stats and model.core[0].attn.qkv.weight.grad is not None


def test_self_conditioning_feeds_the_previous_estimate(monkeypatch):
    model = tiny_model(self_condition=True)
    calls = record_denoise_calls(monkeypatch, model)
    engine.next_token_logprobs(model, batch(), 3, torch.Generator().manual_seed(0))
    seen = [previous for _, _, previous, _ in calls]
    assert seen[0] is None and all(p is not None for p in seen[1:]) and len(seen) == 3


def test_ancestral_step_renoises_the_chosen_estimate(monkeypatch):
    model = tiny_model(solver="ancestral", estimate="argmax")
    recorded = record_denoise_calls(monkeypatch, model)
    engine.next_token_logprobs(model, batch(), 5, torch.Generator().manual_seed(0))
    table = model.target_table()
    calls = [(sigma, z, logits) for sigma, z, _, logits in recorded]
    for (_, _, logits), (sigma_next, z_next, _) in zip(calls, calls[1:]):
        residual = z_next - table[logits.argmax(-1)]  # z_{i+1} = Dhat_i + sigma_{i+1} * eps
        assert residual.std().item() == pytest.approx(sigma_next, rel=0.1)
