"""Sequence-joint DiffusionBlocks (loopdb.models.joint): causal reading of other positions' noisy
states, per-row sigma conditioning, the position schedules, and one pass per training step."""

import pytest
import torch

from loopdb.config import Config, preset
from loopdb.errors import ConfigError
from loopdb.families import build_model, check_config
from loopdb.maths.edm import NoiseSchedule, grid_curve, sigma_grid
from loopdb.maths.schedules import position_progress, position_sigmas
from loopdb.models.joint import JointDiffusionLM
from loopdb.models.looped import LoopedLM
from loopdb.objectives.joint import JointDiffusionObjective, training_sigmas
from loopdb.readouts.scoring import initial_noise, loop_logits

VOCAB, LENGTH = 11, 9


def joint_config(**diffusion) -> Config:
    config = Config()
    config.model.vocab_size, config.model.context, config.model.d_model, config.model.n_heads = VOCAB, 16, 32, 4
    config.model.recurrence = "sequence"
    config.diffusion.sigma_min, config.diffusion.sigma_sampling, config.diffusion.grid = 0.02, "loguniform", "geometric"
    for key, value in diffusion.items():
        setattr(config.diffusion, key, value)
    return check_config(config)


def joint_model(seed=0, **diffusion) -> JointDiffusionLM:
    """A tiny joint model with its adaLN-Zero modulation broken, so sigma and attention carry signal."""
    torch.manual_seed(seed)
    model = build_model(joint_config(**diffusion))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0, 0.1)
    return model.eval()


def test_diffusion_with_sequence_recurrence_builds_the_joint_model_and_auto_stays_per_position():
    assert isinstance(joint_model(), JointDiffusionLM)
    config = Config()
    config.model.vocab_size = VOCAB
    assert isinstance(build_model(check_config(config)), LoopedLM)  # per-position stays the default


def test_a_position_reads_earlier_states_and_never_later_ones():
    model = joint_model()
    tokens = torch.randint(VOCAB, (1, LENGTH))
    z = torch.randn(1, LENGTH, 32, requires_grad=True)
    logits = model.denoise(z, torch.full((1, LENGTH), 0.5), model.encode(tokens, known=False))
    position = 5
    (gradient,) = torch.autograd.grad(logits[0, position].sum(), z)
    influence = gradient[0].abs().sum(-1)
    assert torch.all(influence[position + 1:] == 0), "a later position's state leaked into an earlier one"
    assert torch.all(influence[:position + 1] > 0), "an earlier position's state does not reach a later one"


def test_per_row_sigmas_give_what_each_prefix_gives_alone():
    model = joint_model()
    tokens = torch.randint(VOCAB, (2, LENGTH))
    z = torch.randn(2, LENGTH, 32)
    sigma = torch.exp(torch.empty(2, LENGTH).uniform_(-3, 4))
    with torch.no_grad():
        together = model.denoise(z, sigma, model.encode(tokens, known=False))
        for end in (1, 4, LENGTH):
            alone = model.denoise(z[:, :end], sigma[:, :end], model.encode(tokens[:, :end], known=False))
            torch.testing.assert_close(together[:, :end], alone, atol=1e-5, rtol=1e-5)
        # a per-sequence sigma is the same as that sigma at every position
        per_sequence = model.denoise(z, sigma[:, 0], model.encode(tokens, known=False))
        torch.testing.assert_close(per_sequence, model.denoise(z, sigma[:, :1].expand(2, LENGTH), model.encode(tokens, known=False)))
        # the condition is real: moving one position's sigma changes that position's logits
        moved = sigma.clone()
        moved[:, 3] *= 10
        changed = model.denoise(z, moved, model.encode(tokens, known=False))
    assert not torch.allclose(changed[:, 3], together[:, 3], atol=1e-4)
    torch.testing.assert_close(changed[:, :3], together[:, :3])


def test_wavefront_ends_every_position_at_the_last_sigma_and_width_zero_is_the_grid():
    schedule = NoiseSchedule(sigma_min=0.02, sigma_max=80.0)
    for kind in ("geometric", "equiprob", "karras"):
        curve = grid_curve(schedule, kind, 0.02)
        for loops in (2, 3, 8):
            flat = position_sigmas(loops, LENGTH, curve, 80.0, 0.02, width=0.0)
            expected = torch.tensor(sigma_grid(loops, schedule, kind, 0.02), dtype=torch.float32)
            assert torch.equal(flat, expected[:, None].expand(loops, LENGTH))
            for width in (0.5, 1.0, 3.0):
                front = position_sigmas(loops, LENGTH, curve, 80.0, 0.02, width)
                assert torch.all(front[-1] == 0.02) and torch.all(front[0, 1:] == 80.0)
                assert torch.all(front[1:] <= front[:-1]), "a position's sigma went up"
                assert torch.all(front[:, 1:] >= front[:, :-1]), "a later position ran ahead of an earlier one"
    progress = position_progress(5, LENGTH, 1.0)
    assert progress[2, 0] == 1.0 and progress[2, -1] == 0.0  # halfway: the first is done, the last starts
    assert torch.all(position_progress(1, LENGTH, 2.0) == 0)
    with pytest.raises(ValueError, match="width"):
        position_progress(4, LENGTH, -1.0)


@pytest.mark.parametrize("width", [0.0, 1.0])
def test_k_loops_are_k_evaluations_and_k1_is_one_at_sigma_max(monkeypatch, width):
    model = joint_model(wavefront=width)
    calls = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda z, sigma, context: calls.append(sigma.clone()) or original(z, sigma, context))
    tokens = torch.randint(VOCAB, (2, LENGTH))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = model.encode(tokens)
        for loops in (1, 4):
            calls.clear()
            z = initial_noise(model, (2, LENGTH, 32), loops, generator, "cpu")
            logits = loop_logits(model, context, z, loops, generator)
            assert len(calls) == loops and logits.shape == (2, LENGTH, VOCAB)
            assert torch.all(calls[0] == 80.0) and (loops == 1 or torch.all(calls[-1] == 0.02))


def test_a_training_step_is_one_forward_and_one_backward_pass():
    model = joint_model().train()
    forwards, backwards = [], []
    for layer in model.core:
        layer.register_forward_hook(lambda *_: forwards.append(1))
        layer.register_full_backward_hook(lambda *_: backwards.append(1))
    batch = {"inputs": torch.randint(VOCAB, (4, LENGTH)), "targets": torch.randint(VOCAB, (4, LENGTH))}
    loss, stats = JointDiffusionObjective().loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert len(forwards) == len(model.core) and len(backwards) == len(model.core)
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.core.parameters())


@pytest.mark.parametrize("state_input", ["unit", "wiener"])
def test_teacher_forced_pass_is_the_denoiser_with_every_earlier_position_clean(state_input):
    # row t of the clean-context pass must give what one denoiser call gives with positions < t at
    # their clean targets at the last sigma and t at its own noisy state (the step accuracy's layout)
    model = joint_model(state_input=state_input).eval()
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randint(VOCAB, (2, LENGTH), generator=generator), torch.randint(VOCAB, (2, LENGTH))
    sigma = torch.exp(torch.empty(2, LENGTH).uniform_(-3.5, 4.0, generator=generator))
    noisy = model.targets(targets) + sigma[..., None] * torch.randn(2, LENGTH, 32, generator=generator)
    with torch.no_grad():
        forced = model(inputs, noisy, sigma, clean_targets=targets)
        context = model.encode(inputs, known=False)
        for t in range(LENGTH):
            earlier = (torch.arange(LENGTH) < t)[None, :, None]
            z = torch.where(earlier, model.targets(targets), noisy)
            alone = model.denoise(z, torch.where(earlier[..., 0], model.sigma_last, sigma), context)
            torch.testing.assert_close(forced[:, t], alone[:, t], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(forced, model(inputs, noisy, sigma))  # the plain pass reads noisy states


def test_clean_context_share_runs_the_core_once_per_sequence_and_is_refused_off_joint():
    model = joint_model(clean_context_fraction=0.5).train()
    rows = []
    model.core[0].register_forward_hook(lambda module, args, output: rows.append(args[0].shape[:2]))
    batch = {"inputs": torch.randint(VOCAB, (4, LENGTH)), "targets": torch.randint(VOCAB, (4, LENGTH))}
    loss, _ = JointDiffusionObjective().loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    # two sequences with their clean stream (2T rows), two plain ones; each sequence through the core once
    assert sorted(rows) == [(2, LENGTH), (2, 2 * LENGTH)] and torch.isfinite(loss)
    config = joint_config(clean_context_fraction=0.5)
    config.model.recurrence = "position"
    with pytest.raises(ConfigError, match="clean_context_fraction belong to sequence-joint"):
        check_config(config)
    with pytest.raises(ConfigError, match="clean_context_fraction must be in"):
        joint_config(clean_context_fraction=1.5)


def test_training_sigmas_per_position_share_and_coverage_of_sigma_max():
    diffusion = joint_config(position_sigma_fraction=0.5).diffusion
    schedule = NoiseSchedule(sigma_min=0.02, sigma_max=80.0)
    sigma = training_sigmas(diffusion, schedule, (400, LENGTH), torch.Generator().manual_seed(0))
    varies = (sigma != sigma[:, :1]).any(1).float().mean()
    assert 0.4 < float(varies) < 0.6
    assert float(sigma.min()) >= 0.02 and float(sigma.max()) <= 80.0
    assert float((sigma > 20).float().mean()) > 0.1  # log-uniform: the top octaves are drawn as often as any
    diffusion.position_sigma_fraction = 0.0
    sigma = training_sigmas(diffusion, schedule, (8, LENGTH), torch.Generator().manual_seed(0))
    assert torch.all(sigma == sigma[:, :1])


def test_joint_keys_are_refused_on_other_wirings_and_remedies_on_the_joint_one():
    for key in ("wavefront", "wavefront_sigma_fraction"):
        config = Config()
        setattr(config.diffusion, key, 0.5)
        with pytest.raises(ConfigError, match=key):
            check_config(config)
    config = Config()
    config.diffusion.state_input = "wiener"
    with pytest.raises(ConfigError, match="state_input belongs to sequence-joint"):
        check_config(config)
    with pytest.raises(ConfigError, match="state_input must be unit or wiener"):
        joint_config(state_input="posterior")
    config = joint_config()
    config.diffusion.self_condition = True
    with pytest.raises(ConfigError, match="self_condition"):
        check_config(config)


def test_wiener_state_input_reads_pure_noise_as_almost_nothing_and_clean_states_as_unit_does():
    """state_input=wiener scales a state by c_skip / sigma_data: far above sigma_data two different
    states give the same logits (EDM's c_in gives different ones), and near sigma = 0 both read the
    state alike."""
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    first, second = torch.randn(2, 2, LENGTH, 32) * 1e4  # states at sigma 1e4: pure noise
    logits = {}
    for state_input in ("unit", "wiener"):
        model = joint_model(state_input=state_input)
        context = model.encode(tokens)
        with torch.no_grad():
            logits[state_input] = [model.denoise(z, 1e4, context) for z in (first, second)]
            clean = model.targets(torch.randint(0, VOCAB, (2, LENGTH)))
            logits[state_input].append(model.denoise(clean, 1e-4, context))
    assert (logits["unit"][0] - logits["unit"][1]).abs().max() > 0.1
    assert (logits["wiener"][0] - logits["wiener"][1]).abs().max() < 1e-3
    torch.testing.assert_close(logits["wiener"][2], logits["unit"][2], atol=1e-4, rtol=1e-4)


def test_the_preset_is_the_depth_task_with_the_joint_wiring():
    config = preset("depth-db-tiny")
    assert config.recurrence == "sequence" and config.train.objective == "diffusion"
    assert config.train.task == preset("depth-tiny").train.task


def test_the_cache_holds_known_positions_at_their_clean_targets_at_the_last_sigma():
    model = joint_model(wavefront=1.0)
    tokens = torch.randint(VOCAB, (1, LENGTH))
    last = model.sigma_last
    z = torch.randn(1, 1, 32)
    with torch.no_grad():
        cached = model.encode(tokens[:, :4], known=True)
        for index in range(4, LENGTH):
            cached = model.encode(tokens[:, index:index + 1], cache=cached)
        from_cache = model.denoise(z, torch.full((1, 1), 3.0), cached)
        # the same position in one pass over the whole sequence, the known ones clean at the last sigma
        states = torch.cat([model.targets(tokens[:, 1:]), z], 1)
        sigma = torch.cat([torch.full((1, LENGTH - 1), last), torch.full((1, 1), 3.0)], 1)
        whole = model.denoise(states, sigma, model.encode(tokens, known=False))[:, -1:]
    torch.testing.assert_close(from_cache, whole, atol=1e-5, rtol=1e-5)
    assert cached.committed == LENGTH - 1 and cached.embedded.shape[1] == LENGTH


def test_generation_with_and_without_the_cache_gives_the_same_tokens():
    from loopdb.readouts.generation import generate

    model = joint_model(wavefront=1.0)
    prompt = [1, 2, 3]
    with torch.no_grad():
        cached = generate(model, prompt, 20, 4, temperature=1.0, seed=3)  # slides the 16-token window once
        uncached = generate(model, prompt, 20, 4, temperature=1.0, seed=3, use_cache=False)
    assert cached == uncached and len(cached) == 20


def test_a_task_model_generates_by_denoising_the_whole_window_as_scoring_does():
    from loopdb.readouts.generation import generate

    model = joint_model(wavefront=1.0)
    model.targets_are_next_tokens = False  # a reasoning task: prompt positions' targets are unknown
    prompt = torch.randint(VOCAB, (1, 6))
    with torch.no_grad():
        token = generate(model, prompt[0].tolist(), 1, 4, temperature=0.0, seed=5)[0]
        generator = torch.Generator().manual_seed(5)
        z = initial_noise(model, (1, 6, 32), 4, generator, "cpu")
        expected = int(loop_logits(model, model.encode(prompt), z, 4, generator)[0, -1].argmax())  # not known
    assert token == expected


def test_with_a_known_prefix_each_scored_row_reads_the_clean_prefix_before_it_alone():
    """Text scoring: row t (noisy, its own sigma) reads positions < t at their clean targets and
    itself; it equals the generation step at t, and no other noisy row reaches it."""
    model = joint_model()
    tokens = torch.randint(VOCAB, (1, LENGTH))
    z = torch.randn(1, LENGTH, 32, requires_grad=True)
    sigma = torch.exp(torch.empty(1, LENGTH).uniform_(-3, 4))
    context = model.encode(tokens)  # a text model: known prefix
    assert context.committed == LENGTH - 1
    logits = model.denoise(z, sigma, context)
    (gradient,) = torch.autograd.grad(logits[0, 5].sum(), z)
    assert torch.all(gradient[0, :5] == 0) and torch.all(gradient[0, 6:] == 0) and gradient[0, 5].abs().sum() > 0
    with torch.no_grad():
        step = model.denoise(z[:, 5:6].detach(), sigma[:, 5:6], model.encode(tokens[:, :6]))
    torch.testing.assert_close(step[:, 0], logits[:, 5].detach(), atol=1e-5, rtol=1e-5)


def test_a_clean_prompt_sits_at_its_placeholder_at_the_last_sigma_whatever_its_state():
    """With prompt openers, the positions before the first opener enter as the placeholder's clean
    target at the last sigma in every denoiser call: their noisy states and sigmas change nothing,
    and the answers still read each other causally."""
    config = joint_config()
    torch.manual_seed(0)
    model = JointDiffusionLM(config.model, config.diffusion, targets_are_next_tokens=False, prompt_openers=[3]).eval()
    tokens = torch.tensor([[5, 6, 7, 3, 8, 3, 9, 5, 6]])  # prompt: positions 0-2
    context = model.encode(tokens)
    assert context.prompt.tolist() == [[True] * 3 + [False] * 6]
    z = torch.randn(1, LENGTH, 32, requires_grad=True)
    sigma = torch.exp(torch.empty(1, LENGTH).uniform_(-3, 4))
    logits = model.denoise(z, sigma, context)
    (gradient,) = torch.autograd.grad(logits[0, 6].sum(), z)
    assert torch.all(gradient[0, :3] == 0) and torch.all(gradient[0, 3:7].abs().sum(-1) > 0)
    with torch.no_grad():
        held = z.detach().clone()
        held[:, :3] = model.targets(torch.zeros(1, 3, dtype=torch.long))
        clean_sigma = sigma.clone()
        clean_sigma[:, :3] = model.sigma_last
        plain = JointDiffusionLM(config.model, config.diffusion, targets_are_next_tokens=False).eval()
        plain.load_state_dict(model.state_dict())
        expected = plain.denoise(held, clean_sigma, plain.encode(tokens))
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)


def test_clean_prompt_is_refused_without_a_task_or_the_joint_wiring():
    config = joint_config()
    config.diffusion.clean_prompt = True
    with pytest.raises(ConfigError, match="clean_prompt"):
        check_config(config)
    config = preset("depth-tiny")  # a task, trained with BPTT
    config.diffusion.clean_prompt = True
    with pytest.raises(ConfigError, match="clean_prompt"):
        check_config(config)
    config = preset("depth-db-tiny")
    config.diffusion.clean_prompt = True
    from loopdb.tasks import get_task
    assert build_model(check_config(config)).opener.nonzero().flatten().tolist() == sorted(
        get_task(config.train.task).opener_ids())


def test_training_draws_a_held_prompt_at_the_last_sigma_and_the_answers_as_before():
    config = joint_config()
    torch.manual_seed(0)
    model = JointDiffusionLM(config.model, config.diffusion, targets_are_next_tokens=False, prompt_openers=[3]).train()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(args[2]))
    inputs = torch.tensor([[5, 6, 7, 3, 8, 3, 9, 5, 6]] * 4)
    batch = {"inputs": inputs, "targets": torch.randint(VOCAB, (4, LENGTH))}
    JointDiffusionObjective().loss(model, batch, torch.Generator().manual_seed(0))
    model.opener = None
    JointDiffusionObjective().loss(model, batch, torch.Generator().manual_seed(0))
    held, plain = seen
    assert torch.all(held[:, :3] == model.sigma_last) and torch.equal(held[:, 3:], plain[:, 3:])
    assert not torch.all(plain[:, :3] == model.sigma_last)


def test_wavefront_rows_put_earlier_positions_at_lower_sigma_and_span_the_range():
    diffusion = joint_config(position_sigma_fraction=1.0, wavefront_sigma_fraction=1.0).diffusion
    schedule = NoiseSchedule(sigma_min=0.02, sigma_max=80.0)
    sigma = training_sigmas(diffusion, schedule, (300, LENGTH), torch.Generator().manual_seed(0))
    assert torch.all(sigma[:, 1:] >= sigma[:, :-1] * (1 - 1e-6)), "a later position is cleaner than an earlier one"
    assert float(sigma.min()) == pytest.approx(0.02) and float(sigma.max()) == pytest.approx(80.0)
    assert float((sigma[:, 0] < sigma[:, -1]).float().mean()) > 0.5  # most rows are mid-descent, not flat
    diffusion.wavefront_sigma_fraction = 0.5
    sigma = training_sigmas(diffusion, schedule, (400, LENGTH), torch.Generator().manual_seed(0))
    ordered = (sigma[:, 1:] >= sigma[:, :-1] * (1 - 1e-6)).all(1).float().mean()
    assert 0.4 < float(ordered) < 0.65  # the other half draws independent sigmas (rarely ordered by chance)


def test_step_accuracy_asks_each_answer_from_its_resolved_predecessors_alone():
    """The m-th answer is asked at sigma_max with the answers before it at their clean targets at the
    last sigma, the later ones at sigma_max; an oracle right only on that layout scores 1.0 at every
    answer of rows of different lengths, and a model of another wiring is refused."""
    from loopdb.errors import UsageError
    from loopdb.readouts.reasoning import evaluation_examples, step_accuracy
    from loopdb.tasks import get_task, training_arrays

    task = get_task("hops")
    config = joint_config()
    config.model.vocab_size = task.tokenizer().vocab_size
    torch.manual_seed(0)
    model = JointDiffusionLM(config.model, config.diffusion, targets_are_next_tokens=False).eval()
    examples = evaluation_examples(task, "test", [2, 3, 4], 5)
    _, targets = training_arrays(task, examples)
    table, calls = model.target_table(), []

    def oracle(z, sigma, context):
        calls.append(1)
        scored = targets >= 0
        order = scored.long().cumsum(1) - 1
        logits = torch.nn.functional.one_hot((targets.clamp(min=0) + 1) % table.shape[0], table.shape[0]).float()
        for row in range(targets.shape[0]):
            answers = scored[row].nonzero()[:, 0]
            noisy = [p for p in answers.tolist() if sigma[row, p] == model.schedule.sigma_max]
            if not noisy:
                continue
            asked = noisy[0]
            before = answers[answers < asked]
            resolved = bool(torch.all(sigma[row, before] == model.sigma_last)
                            and torch.equal(z[row, before], table[targets[row, before]]))
            wrong_first = row == 0 and asked == answers[0] and miss_first_of_row_0
            if resolved and not wrong_first and all(sigma[row, p] == model.schedule.sigma_max
                                                    for p in answers[answers > asked].tolist()):
                logits[row, asked] = torch.nn.functional.one_hot(targets[row, asked], table.shape[0]).float()
        return logits

    model.denoise = oracle
    miss_first_of_row_0 = False
    result = step_accuracy(model, task, examples)
    # each answer asked twice: from the true earlier answers and, chained, from the model's own
    assert result == {"mean": 1.0, "by_answer": [1.0, 1.0, 1.0, 1.0], "chained": 1.0} and len(calls) == 8
    miss_first_of_row_0 = True  # one wrong first answer: its step alone, but the chain of that row
    result = step_accuracy(model, task, examples)
    assert result["by_answer"] == [14 / 15, 1.0, 1.0, 1.0] and result["chained"] == 14 / 15
    with pytest.raises(UsageError, match="sequence-joint"):
        step_accuracy(LoopedLM(config.model, config.diffusion), task, examples)


def test_score_of_a_joint_task_run_reports_its_step_accuracy(tmp_path, capsys, monkeypatch):
    import json

    from loopdb.cli import main

    monkeypatch.setenv("LOOPDB_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    small = ["--d_model=32", "--n_heads=4", "--batch_size=8", "--max_steps=2", "--eval_every=2", "--warmup_steps=1",
             "--eval_loops=1", "--eval_examples=2", "--train_difficulties=2-4", "--test_difficulties=2-6",
             "--checkpoint_every=2"]
    assert main(["train", "--preset", "depth-db-tiny", "--out", str(run), "--quiet", *small]) == 0
    capsys.readouterr()
    assert main(["score", str(run), "--loops", "1,2", "--max-windows", "3", "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["step_accuracy"]
    assert len(step["by_answer"]) == 4 and 0 <= step["mean"] <= 1  # s3 answers every element: 4 at difficulty 4
    assert main(["score", str(run), "--loops", "1", "--max-windows", "2"]) == 0
    assert "one step from resolved earlier answers" in capsys.readouterr().out
