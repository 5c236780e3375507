"""Recurrent depth (docs/method.md#recurrent-depth): Huginn's sequence recurrence, BPTT and Ouro's
objective on it, adaptive exit, and runs on a reasoning task."""

import json
import math

import pytest
import torch

from loopdb.cli import main
from loopdb.config import Config, preset
from loopdb.families import build_model, check_config, family_of
from loopdb.maths.exit import ExitRule, parse_exit
from loopdb.models.joint import JointDiffusionLM
from loopdb.models.looped import LoopedLM
from loopdb.models.recurrent import RecurrentDepthLM
from loopdb.objectives.next_token import (IGNORE_INDEX, BPTTObjective, OuroObjective, exit_distribution,
                                          make_objective, token_cross_entropy)
from loopdb.readouts import generation
from loopdb.readouts.reasoning import loop_with_exit
from loopdb.errors import ConfigError, UsageError

VOCAB = 16


def recurrent_config(objective="bptt", **model) -> Config:
    config = Config()
    config.model.vocab_size, config.model.context, config.model.d_model, config.model.n_heads = VOCAB, 24, 32, 4
    config.train.objective = objective
    for key, value in model.items():
        setattr(config.model, key, value)
    return check_config(config)


def recurrent_model(objective="bptt", seed=0, **model):
    torch.manual_seed(seed)
    return build_model(recurrent_config(objective, **model)).eval()


def test_auto_recurrence_is_sequence_for_bptt_and_ouro_and_per_position_for_diffusion():
    assert isinstance(recurrent_model("bptt"), RecurrentDepthLM)
    assert isinstance(recurrent_model("ouro"), RecurrentDepthLM) and recurrent_model("ouro").exit_gate is not None
    assert isinstance(recurrent_model("diffusion"), LoopedLM)
    assert isinstance(recurrent_model("bptt", recurrence="position"), LoopedLM)
    # diffusion with sequence recurrence is the sequence-joint DiffusionBlocks model (tests/test_joint.py)
    assert isinstance(recurrent_model("diffusion", recurrence="sequence"), JointDiffusionLM)


def test_a_state_at_loop_k_depends_on_the_previous_position_at_loop_k_minus_1_and_never_on_later_ones():
    model = recurrent_model(sandwich_norm=True)
    context = model.encode(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    start = torch.randn(1, 6, 32, requires_grad=True)
    one = model.recur(start, context)
    two = model.recur(one, context)
    # position 3 after two loops reads position 2 after one loop, which itself reads positions <= 2
    from_one = torch.autograd.grad(two[0, 3].sum(), one, retain_graph=True)[0][0].abs().sum(-1)
    assert from_one[2] > 0 and from_one[:4].min() > 0 and from_one[4:].abs().max() == 0
    from_start = torch.autograd.grad(two[0, 3].sum(), start)[0][0].abs().sum(-1)
    assert from_start[:4].min() > 0 and from_start[4:].abs().max() == 0  # never a later position


def test_the_per_position_wiring_cannot_see_another_positions_state():
    model = recurrent_model("bptt", recurrence="position")
    context = model.encode(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    state = torch.randn(1, 6, 32, requires_grad=True)
    grad = torch.autograd.grad(model.recur(model.recur(state, context), context)[0, 3].sum(), state)[0][0]
    assert grad[3].abs().sum() > 0 and grad[[0, 1, 2, 4, 5]].abs().max() == 0


def test_per_position_mode_is_todays_model():
    config = recurrent_config("bptt", recurrence="position")
    torch.manual_seed(3)
    built = build_model(config)
    torch.manual_seed(3)
    direct = LoopedLM(config.model, config.diffusion, "recurrent")
    objective = BPTTObjective(config.train.mean_depth, config.train.backprop_depth)
    tokens = torch.randint(VOCAB, (2, 9))
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(family_of(config).objective(config).loss(built, tokens, generator())[0],
                       objective.loss(direct, tokens, generator())[0])


def test_bptt_gradients_reach_only_the_last_k_loops(monkeypatch):
    model = recurrent_model().train()
    objective = BPTTObjective(mean_depth=7, backprop_depth=3, depth_sampler="fixed")
    grad_enabled = []
    original = model.recur
    monkeypatch.setattr(model, "recur", lambda state, context: grad_enabled.append(torch.is_grad_enabled())
                        or original(state, context))
    loss, stats = objective.loss(model, torch.randint(VOCAB, (2, 9)), torch.Generator().manual_seed(0))
    assert grad_enabled == [False] * 4 + [True] * 3 and float(stats["depth"]) == 7
    loss.backward()
    assert model.core[0].attn.qkv.weight.grad.abs().sum() > 0


def test_ouro_exit_distribution_sums_to_one_and_one_loop_is_plain_cross_entropy():
    gates = [torch.rand(3, 5) for _ in range(4)]
    total = sum(exit_distribution(gates))
    assert torch.allclose(total, torch.ones(3, 5), atol=1e-6)
    model = recurrent_model("ouro").train()
    tokens = torch.randint(VOCAB, (2, 9))
    one_loop = OuroObjective(max_loops=1, exit_entropy=0.5)
    loss, _ = one_loop.loss(model, tokens, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    context = model.encode(tokens[:, :-1])
    state = torch.randn((2, 8, 32), generator=generator)
    plain = token_cross_entropy(model.readout(model.recur(state, context), context), tokens[:, 1:]).mean()
    assert torch.allclose(loss, plain, atol=1e-6)
    loss, stats = OuroObjective(max_loops=3).loss(model, tokens, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.exit_gate.weight.grad.abs().sum() > 0 and 1 <= float(stats["mean_exit"]) <= 3


def test_a_task_batch_scores_answer_tokens_only():
    model = recurrent_model().train()
    inputs = torch.randint(VOCAB, (2, 6))
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[:, 2], targets[0, 5] = 3, 7
    batch = {"inputs": inputs, "targets": targets}
    loss, _ = BPTTObjective(mean_depth=2, backprop_depth=2, depth_sampler="fixed").loss(
        model, batch, torch.Generator().manual_seed(0))
    context = model.encode(inputs)
    state = torch.randn((2, 6, 32), generator=torch.Generator().manual_seed(0))
    logits = model.readout(model.recur(model.recur(state, context), context), context)
    log_probs = torch.log_softmax(logits.float(), -1)
    per_row = torch.stack([-(log_probs[0, 2, 3] + log_probs[0, 5, 7]) / 2, -log_probs[1, 2, 3]])
    assert torch.allclose(loss, per_row.mean(), atol=1e-5)


class Converging(torch.nn.Module):
    """A recurrence whose state moves by 2^-k at loop k, with a constant exit gate."""

    loop = "recurrent"  # what one loop is (loopdb.sampling)

    def __init__(self, gate: float):
        super().__init__()
        self.gate, self.count = gate, 0

    def recur(self, state, context):
        self.count += 1
        return state + 2.0 ** -self.count

    def readout(self, state, context):
        return torch.cat([state[..., :1], -state[..., :1]], -1) * 10

    def exit_probability(self, state):
        return torch.full(state.shape[:2], self.gate)


@pytest.mark.parametrize("rule, expected", [
    ("delta:0.01", 7),   # after loop k the state is 1 - 2^-k, its change 2^-k: 2^-7 / (1 - 2^-7) = 0.0079
    ("gate:0.5", 2),     # 1 - 0.7^k >= 0.5 first at k = 2
    ("gate:0.9", 7),     # 1 - 0.7^7 = 0.918
])
def test_exit_criteria_stop_at_the_expected_loop(rule, expected):
    _, used = loop_with_exit(Converging(gate=0.3), None, torch.zeros(1, 3, 4), 20, parse_exit(rule))
    assert used.unique().tolist() == [expected]


def test_kl_exit_stops_once_successive_distributions_agree():
    _, used = loop_with_exit(Converging(gate=0.0), None, torch.zeros(1, 2, 4), 30, parse_exit("kl:1e-4"))
    assert 2 <= int(used[0, 0]) < 30 and used.unique().numel() == 1


def test_exit_rules_are_parsed_or_refused_in_one_line():
    assert parse_exit("kl:5e-4") == ExitRule("kl", 5e-4) and parse_exit(None) is None
    for bad in ("kl", "kl:-1", "gate:2", "median:0.1", "delta:x"):
        with pytest.raises(UsageError, match="--exit"):
            parse_exit(bad)


def test_cached_and_uncached_generation_agree_and_the_cache_grows_with_the_loops():
    model = recurrent_model()
    sizes = {}
    for loops in (1, 4):
        stats = {}
        cached = generation.generate(model, [1, 2, 3], 30, loops, temperature=0, stats=stats)  # slides past 24
        uncached = generation.generate(model, [1, 2, 3], 30, loops, temperature=0, use_cache=False)
        assert cached == uncached
        sizes[loops] = stats["cache_bytes"]
    shortcut = {}
    generation.generate(model, [1, 2, 3], 30, 4, temperature=0, last_cache_only=True, stats=shortcut)
    assert sizes[4] > sizes[1] and shortcut["cache_bytes"] == sizes[1]
    with pytest.raises(ValueError, match="exit gate"):
        generation.generate(model, [1, 2, 3], 2, 4, exit_rule=parse_exit("gate:0.5"))


def test_an_exited_token_uses_fewer_loops_in_generation():
    model = recurrent_model("ouro")
    with torch.no_grad():
        model.exit_gate.bias.fill_(5.0)  # lambda ~ 0.99: every token exits after its first loop
    stats = {}
    generation.generate(model, [1, 2, 3], 6, 8, temperature=0, exit_rule=parse_exit("gate:0.9"), stats=stats)
    assert stats["mean_loops"] == 1.0


def test_a_task_run_trains_scores_per_difficulty_and_evaluates_through_lm_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOOPDB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    run = tmp_path / "run"
    small = ["--d_model=32", "--n_heads=4", "--batch_size=8", "--max_steps=3", "--eval_every=3", "--warmup_steps=1",
             "--eval_loops=1,2", "--eval_examples=4", "--train_difficulties=2-4", "--test_difficulties=",
             "--checkpoint_every=3"]
    assert main(["train", "--preset", "depth-tiny", "--out", str(run), "--quiet", *small]) == 0
    capsys.readouterr()
    assert main(["score", str(run), "--loops", "1,3", "--max-windows", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "s3" and set(report["accuracy"]) == {"1", "3"}
    assert set(report["accuracy_by_difficulty"]["3"]) == {str(d) for d in range(2, 9)}  # trained 2-4, then to 8
    assert all(0 <= v <= 1 for v in report["accuracy"].values()) and report["mean_loops"]["3"] == 3
    assert "step_accuracy" not in report  # a joint model's readout
    assert main(["score", str(run), "--loops", "4", "--max-windows", "2", "--exit", "delta:0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_loops"]["4"] <= 4
    assert main(["score", str(run), "--exit", "gate:0.5"]) == 2  # a bptt model has no exit gate: one line
    assert "exit gate" in capsys.readouterr().err
    assert main(["sample", str(run), "--prompt", " 012 120", "--max-new-tokens", "1", "--loops", "2"]) == 0
    assert capsys.readouterr().out.startswith(" 012 120")
    from loopdb.tasks import get_task, write_task_folder

    folder = tmp_path / "heldout"
    write_task_folder(get_task("s3"), 4242, [2, 3], 3, folder, name="s3_heldout")
    output = tmp_path / "eval.json"
    assert main(["eval", str(run), "--tasks", "s3_heldout", "--include-path", str(folder), "--loops", "1,2",
                 "--output", str(output), "--device", "cpu"]) == 0
    summary = json.loads(output.read_text())["summary"]["s3_heldout"]
    assert set(summary["exact_match"]) == {"1", "2"}
    from loopdb.evaluation.lm_eval_model import LoopDBLM

    harness = LoopDBLM(run=run)  # the preset opens every sequence with the newline, so every prompt gets it too
    assert harness.opened([5, 6]) == [0, 5, 6] and harness.opened([0, 5]) == [0, 5] and harness.opened([]) == [0]


def test_a_task_run_refuses_a_window_too_short_for_its_difficulties(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPDB_DATA", str(tmp_path / "data"))
    code = main(["train", "--preset", "depth-tiny", "--out", str(tmp_path / "run"), "--context=16", "--quiet"])
    assert code == 2
