"""The three objectives of the looped LM: one model class, one scoring path."""

import json

import pytest
import torch

from conftest import SMALL_RUN, VOCAB, tiny_model
from loopdb.readouts import scoring as engine
from loopdb.readouts import generation
from loopdb.cli import main
from loopdb.models.looped import LoopedLM
from loopdb.objectives.next_token import BPTTObjective, DenseObjective, DiffusionObjective, sample_depth


def tokens(batch=2, length=13, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mean_depth", [4, 32])
def test_poisson_lognormal_depth_has_mean_r_bar(mean_depth):
    generator = torch.Generator().manual_seed(0)
    depths = torch.tensor([sample_depth("poisson_lognormal", mean_depth, generator) for _ in range(20_000)]).float()
    assert depths.mean().item() == pytest.approx(mean_depth, rel=0.05)
    assert depths.min() >= 1
    assert depths.std() > 0.3 * mean_depth  # heavy-tailed, not a fixed depth


def test_depth_is_deterministic_per_step():
    from loopdb.training.trainer import step_generator

    first = [sample_depth("poisson_lognormal", 32, step_generator(0, step)) for step in range(50)]
    again = [sample_depth("poisson_lognormal", 32, step_generator(0, step)) for step in range(50)]
    assert first == again and len(set(first)) > 5
    assert sample_depth("fixed", 7, step_generator(0, 0)) == 7
    uniform = [sample_depth("uniform", 5, step_generator(0, s)) for s in range(500)]
    assert min(uniform) == 1 and max(uniform) == 9


def test_bptt_differentiates_exactly_the_last_k_iterations(monkeypatch):
    model = tiny_model(seed=1).train()
    objective = BPTTObjective(mean_depth=10, backprop_depth=3, depth_sampler="fixed")
    model.loop = "recurrent"
    calls = []
    original = model.recur

    def spy(state, context):
        calls.append(torch.is_grad_enabled())
        out = original(state, context)
        out.retain_grad() if out.requires_grad else None
        states.append(out)
        return out

    states = []
    monkeypatch.setattr(model, "recur", spy)
    loss, stats = objective.loss(model, tokens(2, 9), torch.Generator().manual_seed(0))
    loss.backward()
    assert calls == [False] * 7 + [True] * 3
    assert [s.requires_grad for s in states] == [False] * 7 + [True] * 3
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in states[7:])
    assert stats["depth"].item() == 10
    assert model.core[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_objectives_share_one_model_class_and_one_scoring_path():
    x = tokens(2, 9)
    for objective, loop in ((DiffusionObjective(), "diffusion"), (BPTTObjective(4, 2), "recurrent"),
                            (DenseObjective(), "dense")):
        model = tiny_model()
        model.loop = loop
        assert type(model) is LoopedLM
        loss, _ = objective.loss(model.train(), tokens(2, 9), torch.Generator().manual_seed(0))
        loss.backward()
        model.eval()
        for loops in (1, 3):
            logprobs = engine.next_token_logprobs(model, x, loops, torch.Generator().manual_seed(0))
            assert logprobs.shape == (2, 8) and torch.isfinite(logprobs).all()
        assert generation.generate(model, [1, 2, 3], 20, 2, seed=1) == generation.generate(model, [1, 2, 3], 20, 2, seed=1,
                                                                                 use_cache=False)


def test_dense_ignores_the_loop_count_and_noise():
    model = tiny_model()
    model.loop = "dense"
    x = tokens(2, 9)
    one = engine.next_token_logprobs(model, x, 1, torch.Generator().manual_seed(0))
    many = engine.next_token_logprobs(model, x, 7, torch.Generator().manual_seed(5))
    assert torch.equal(one, many)


def test_bptt_loops_change_the_prediction():
    model = tiny_model()
    model.loop = "recurrent"
    x = tokens(2, 9)
    one = engine.next_token_logprobs(model, x, 1, torch.Generator().manual_seed(0))
    eight = engine.next_token_logprobs(model, x, 8, torch.Generator().manual_seed(0))
    assert not torch.allclose(one, eight)


def test_compare_command_writes_results(capsys, data_dir, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "2",
                 "--loops", "1,2", "--max-windows", "2", "--samples", "1", *SMALL_RUN, "--mean_depth=4"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"diffusion", "bptt", "dense"}
    for name, member in results["models"].items():
        assert member["steps"] == 2 and member["peak_rss_mb"] > 50 and member["step_ms"] > 0
        assert set(member["bpb"]) == ({"1"} if name == "dense" else {"1", "2"})
    assert "| diffusion |" in (out / "results.md").read_text()
    assert (out / "bpb_vs_loops.png").stat().st_size > 1000
    # finished members are reused, not retrained
    before = (out / "bptt" / "train_summary.json").stat().st_mtime
    assert main(["compare", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "2",
                 "--loops", "1,2", "--max-windows", "2", "--samples", "1", *SMALL_RUN, "--mean_depth=4"]) == 0
    assert (out / "bptt" / "train_summary.json").stat().st_mtime == before


def test_compare_needs_exactly_one_budget(capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of" in capsys.readouterr().err
