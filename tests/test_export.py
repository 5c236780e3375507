"""`loopdb export`: a run as a transformers folder that from_pretrained, generate and lm-eval's hf model use.

Runs of 20 steps of the tiny and tiny-stacked presets shrunk to SMALL_RUN (16-token window,
d_model 32) for each objective, of sequence-joint DiffusionBlocks (``joint``: a sigma per position,
the wavefront sampler on a geometric grid) and of the tiny-draft preset (``draft``: 4 slots per position
with the likelihood evidence in the logits, and the anchor head). Tolerance of logits against loopdb's own: 1e-5 absolute (float32, the same
operations in the same order up to the attention kernel).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SMALL_RUN

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "eval" / "tasks"
OBJECTIVES = ("diffusion", "bptt", "ouro", "dense", "stacked-diffusion", "stacked-dense", "joint", "draft")
ATOL = 1e-5
JOINT = ("--objective=diffusion", "--recurrence=sequence", "--wavefront=1", "--position_sigma_fraction=0.5",
         "--sigma_sampling=loguniform", "--grid=geometric", "--train_grid_fraction=0")


def train_and_export(data_dir, folder: Path, name: str, *extra) -> tuple[Path, Path]:
    """A 20-step run of the tiny preset (``stacked-*``: tiny-stacked; ``joint``: sequence-joint; ``draft``:
    tiny-draft) shrunk to SMALL_RUN, and its export (3 noise draws by default)."""
    from loopdb.cli import main

    family, _, objective = name.rpartition("-")
    preset = "tiny-stacked" if family == "stacked" else "tiny-draft" if name == "draft" else "tiny"
    flags = JOINT if name == "joint" else ("--objective=diffusion",) if name == "draft" else (f"--objective={objective}",)
    run, out = folder / name, folder / f"{name}-hf"
    assert main(["train", "--preset", preset, "--data", str(data_dir), "--out", str(run), "--quiet", *SMALL_RUN,
                 "--max_steps=20", *flags, "--max_loops=3", "--mean_depth=3", *extra]) == 0
    assert main(["export", str(run), "--out", str(out), "--samples", "3"]) == 0
    return run, out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """name in OBJECTIVES -> (run folder, export folder)."""
    folder = tmp_path_factory.mktemp("runs")
    return {objective: train_and_export(data_dir, folder, objective) for objective in OBJECTIVES}


DEPTH_RUNS = {"depth-tiny": ("depth-tiny", "--embedded_norm=true"), "depth-db-tiny": ("depth-db-tiny",),
              "depth-db-tiny-clean": ("depth-db-tiny", "--start_token=true", "--clean_prompt=true", "--state_input=wiener")}


@pytest.fixture(scope="module", params=list(DEPTH_RUNS))
def depth_run(tmp_path_factory, request):
    """20 steps of a depth preset on the S3 task with its word tokenizer, exported: depth-tiny (sequence-recurrent
    BPTT, with the prelude output normalized before the injection; the other BPTT runs here inject it as it is)
    or depth-db-tiny (sequence-joint DiffusionBlocks, every position denoised jointly, the wavefront), also with
    a start token held clean as the task's prompt and the states read as their posterior mean (state_input=wiener)."""
    from loopdb.cli import main

    folder = tmp_path_factory.mktemp("depth")
    run, out = folder / "run", folder / "hf"
    preset_name, *extra = DEPTH_RUNS[request.param]
    assert main(["train", "--preset", preset_name, "--out", str(run), "--quiet", "--max_steps=20", "--d_model=32",
                 "--batch_size=8", "--eval_loops=1,2", "--eval_examples=2", "--test_difficulties=2,3", *extra]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    return run, out


def load_pair(runs, objective, **overrides):
    from transformers import AutoModelForCausalLM

    from loopdb.runs.folder import load_model

    run, out = runs[objective]
    return load_model(run)[0], AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **overrides).eval()


def play_windows(data_dir, rows, length, start=0):
    from loopdb.data.storage import load_tokens

    tokens = torch.as_tensor(load_tokens(data_dir, "test")[start:start + rows * length].astype("int64"))
    return tokens.view(rows, length)


# -- logits ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("num_loops", [1, 4])
def test_exported_logits_equal_loopdbs_predictive_readout(runs, data_dir, objective, num_loops):
    from loopdb.readouts import scoring

    model, exported = load_pair(runs, objective)
    inputs = play_windows(data_dir, 3, 16)
    with torch.no_grad():
        ours = scoring.predictive_distribution(model, inputs, num_loops, 3,
                                               [torch.Generator().manual_seed(11) for _ in range(3)])
        theirs = exported(inputs, num_loops=num_loops, noise_seed=11).logits  # num_samples 3 from `--samples 3`
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=0)


def test_the_initial_states_scale_is_the_runs(runs, data_dir):
    from loopdb.readouts import scoring

    model, exported = load_pair(runs, "bptt")
    model.config.state_std = exported.config.state_std = 0.3
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        ours = scoring.predictive_distribution(model, inputs, 2, 3, [torch.Generator().manual_seed(1) for _ in range(2)])
        theirs = exported(inputs, num_loops=2, noise_seed=1).logits
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "stacked-diffusion", "joint", "draft"])
def test_one_draw_readout_equals_loopdbs_last_loop_logits(runs, data_dir, objective):
    from loopdb.readouts import scoring

    model, exported = load_pair(runs, objective)
    inputs = play_windows(data_dir, 1, 16)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        state = scoring.initial_noise(model, (1, 16, model.config.d_model), 4, generator, "cpu")
        ours = scoring.loop_logits(model, model.encode(inputs), state, 4, generator)
        theirs = exported(inputs, num_loops=4, noise_seed=5, readout="draw").logits
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "joint"])
def test_the_noise_seed_makes_a_call_reproducible_and_matters(runs, data_dir, objective):
    exported = load_pair(runs, objective)[1]
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        first, again = (exported(inputs, num_loops=2, noise_seed=1).logits for _ in range(2))
        other = exported(inputs, num_loops=2, noise_seed=2).logits
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "joint"])
def test_a_left_padded_row_gives_what_it_gives_alone(runs, data_dir, objective):
    exported = load_pair(runs, objective)[1]
    inputs = play_windows(data_dir, 2, 12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), inputs[:1, 4:]], dim=1)
    batch = torch.cat([padded, inputs[1:]])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        together = exported(batch, attention_mask=mask, num_loops=3).logits
        alone = exported(inputs[:1, 4:], num_loops=3).logits
    assert torch.allclose(together[0, 4:], alone[0], atol=ATOL, rtol=0)


def test_num_loops_is_a_load_time_default(runs, data_dir):
    model, exported = load_pair(runs, "diffusion", num_loops=2)
    assert exported.config.num_loops == 2
    inputs = play_windows(data_dir, 1, 16)
    with torch.no_grad():
        assert torch.equal(exported(inputs).logits, exported(inputs, num_loops=2).logits)
        assert not torch.allclose(exported(inputs).logits, exported(inputs, num_loops=4).logits)


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "dense", "joint"])
def test_hidden_states_are_the_prelude_output_and_one_state_per_loop(runs, data_dir, objective):
    exported = load_pair(runs, objective)[1]
    with torch.no_grad():
        states = exported(play_windows(data_dir, 1, 16), num_loops=3, output_hidden_states=True).hidden_states
    # diffusion: the sampler's state after each step but the last (the last loop is read out)
    expected = {"diffusion": 3, "bptt": 4, "dense": 2, "joint": 3}[objective]
    assert len(states) == expected
    assert all(state.shape == (1, 16, 32) for state in states)


# -- generation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_greedy_generate_equals_loopdb_sample(runs, objective, capsys):
    """Past the 16-token window, so the window slides as loopdb's does."""
    from transformers import AutoTokenizer

    from loopdb.cli import main

    run, out = runs[objective]
    tokenizer, exported = AutoTokenizer.from_pretrained(out), load_pair(runs, objective)[1]
    for prompt in ["First Witch:\nWhen shall we", "\nMAC"]:
        capsys.readouterr()
        assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0", "--loops", "3",
                     "--max-new-tokens", "30", "--seed", "4", "--device", "cpu"]) == 0
        expected = capsys.readouterr().out[:-1]  # print's newline
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new = exported.generate(ids, max_new_tokens=30, num_loops=3, noise_seed=4)[0, ids.shape[1]:]
        assert prompt + tokenizer.decode(new, skip_special_tokens=False) == expected


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_left_padded_batches_generate_as_loopdbs_generate_batch(runs, objective, temperature):
    """Three prompts of unequal length, 30 new tokens: the window slides for all rows at once."""
    from loopdb.readouts.generation import generate_batch

    model, exported = load_pair(runs, objective)
    prompts = [[3, 100, 200, 17, 5, 9, 44], [3, 101], [3, 7, 8, 9]]
    ours = generate_batch(model, prompts, 30, 3, temperature=temperature, top_k=40, seeds=6)
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[0] * (longest - len(prompt)) + prompt for prompt in prompts])
    mask = torch.tensor([[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt in prompts])
    theirs = exported.generate(ids, attention_mask=mask, max_new_tokens=30, num_loops=3, noise_seed=6,
                               do_sample=temperature > 0, temperature=temperature or None, top_k=40)
    assert theirs[:, longest:].tolist() == ours


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cached_and_recomputed_generation_agree(runs, objective):
    """40 new tokens after a 10-token prompt: the 16-token window slides (and the cache is rebuilt) twice."""
    exported = load_pair(runs, objective)[1]
    prompt = torch.tensor([[3, 100, 200, 17, 5, 9, 44, 21, 8, 3]])
    cached = exported.generate(prompt, max_new_tokens=40, num_loops=3, do_sample=True, noise_seed=2)
    assert torch.equal(cached, exported.generate(prompt, max_new_tokens=40, num_loops=3, do_sample=True, noise_seed=2,
                                                 use_cache=False))


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "stacked-diffusion", "joint", "draft"])
def test_sampled_generate_equals_loopdbs(runs, objective):
    from loopdb.readouts.generation import generate

    model, exported = load_pair(runs, objective)
    prompt = [3, 100, 200]
    ours = generate(model, prompt, 20, 2, temperature=0.8, top_k=30, seed=9)
    theirs = exported.generate(torch.tensor([prompt]), max_new_tokens=20, num_loops=2, noise_seed=9,
                               do_sample=True, temperature=0.8, top_k=30)[0, 3:].tolist()
    assert theirs == ours


@pytest.mark.parametrize("objective, rule", [("bptt", "kl:1e-3"), ("bptt", "delta:0.05"), ("ouro", "gate:0.5")])
def test_adaptive_exit_generates_as_loopdbs(runs, objective, rule):
    from loopdb.maths.exit import parse_exit
    from loopdb.readouts.generation import generate

    model, exported = load_pair(runs, objective)
    prompt, stats = [3, 100, 200, 17, 5], {}
    ours = generate(model, prompt, 24, 6, temperature=0, seed=1, exit_rule=parse_exit(rule), stats=stats)
    for use_cache in (True, False):
        theirs = exported.generate(torch.tensor([prompt]), max_new_tokens=24, num_loops=6, noise_seed=1, exit=rule,
                                   use_cache=use_cache)[0, 5:].tolist()
        assert theirs == ours
        loops = exported.loops_used[0]
        assert sum(loops) / len(loops) == pytest.approx(stats["mean_loops"])
    at_load = load_pair(runs, objective, exit=rule)[1]  # a load-time default, as lm-eval's --model_args give it
    assert at_load.generate(torch.tensor([prompt]), max_new_tokens=24, num_loops=6, noise_seed=1)[0, 5:].tolist() == ours
    assert min(loops) < 6 or rule.startswith("gate")  # the rule stopped some token early


@pytest.mark.parametrize("objective, rule", [("bptt", None), ("ouro", None), ("ouro", "gate:0.5"), ("bptt", "kl:1e-3")])
def test_the_last_loop_cache_generates_as_loopdbs(runs, objective, rule):
    """Ouro's shortcut: one cache set of each position's last loop (30 new tokens: the window slides)."""
    from loopdb.maths.exit import parse_exit
    from loopdb.readouts.generation import generate

    model, exported = load_pair(runs, objective)
    prompt = [3, 100, 200, 17, 5]
    ours = generate(model, prompt, 30, 4, temperature=0, seed=1, exit_rule=parse_exit(rule) if rule else None,
                    last_cache_only=True)
    every_loop = generate(model, prompt, 30, 4, temperature=0, seed=1, exit_rule=parse_exit(rule) if rule else None)
    for use_cache in (True, False):
        theirs = exported.generate(torch.tensor([prompt]), max_new_tokens=30, num_loops=4, noise_seed=1, exit=rule,
                                   last_loop_cache=True, use_cache=use_cache)[0, 5:].tolist()
        assert theirs == ours
    at_load = load_pair(runs, objective, last_loop_cache=True)[1]
    assert at_load.generate(torch.tensor([prompt]), max_new_tokens=30, num_loops=4, noise_seed=1,
                            exit=rule)[0, 5:].tolist() == ours
    default = exported.generate(torch.tensor([prompt]), max_new_tokens=30, num_loops=4, noise_seed=1, exit=rule)
    assert default[0, 5:].tolist() == every_loop


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "dense", "stacked-diffusion", "joint"])
def test_generate_returns_each_new_tokens_states_on_request(runs, data_dir, objective):
    """Per new token: the prelude output of the position it was predicted from, then one state per loop,
    as many as forward's hidden states; the prelude output is forward's at that position."""
    exported = load_pair(runs, objective)[1]
    prompts = play_windows(data_dir, 2, 6)
    plain = exported.generate(prompts, max_new_tokens=5, num_loops=3, noise_seed=3)
    result = exported.generate(prompts, max_new_tokens=5, num_loops=3, noise_seed=3, output_hidden_states=True,
                               return_dict_in_generate=True)
    assert torch.equal(result.sequences, plain) and len(result.hidden_states) == 5
    with torch.no_grad():
        forward = exported(plain[:, :-1], num_loops=3, noise_seed=3, output_hidden_states=True).hidden_states
    for step, states in enumerate(result.hidden_states):
        assert len(states) == len(forward) and all(state.shape == (2, 1, 32) for state in states)
        position = 5 + step  # the position the new token was predicted from
        assert torch.allclose(states[0][:, 0], forward[0][:, position], atol=ATOL, rtol=0)
    if objective == "dense":  # no noise: every state is forward's
        assert all(torch.allclose(state[:, 0], whole[:, 9], atol=ATOL, rtol=0)
                   for state, whole in zip(result.hidden_states[-1], forward))


def test_a_drafting_runs_anchor_head_is_a_readout(runs, data_dir):
    """readout="anchor": the clean stream's next-token log-probabilities, as loopdb's anchor readout; a model
    trained without the anchor head refuses it."""
    from loopdb.readouts import scoring
    from loopdb.sampling import anchor_sampler

    model, exported = load_pair(runs, "draft")
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        ours = scoring.predictive_distribution(model, inputs, 1, 1, [torch.Generator() for _ in range(2)],
                                               sampler=anchor_sampler(model))
        theirs = exported(inputs, readout="anchor").logits
        assert torch.allclose(theirs, ours, atol=ATOL, rtol=0)
        assert not torch.allclose(theirs, exported(inputs, num_loops=4).logits, atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="anchor_weight > 0"):
            load_pair(runs, "diffusion")[1](inputs, readout="anchor")


def test_exit_errors_are_clear(runs):
    with pytest.raises(ValueError, match="sequence-recurrent"):
        load_pair(runs, "diffusion")[1].generate(torch.tensor([[3, 4]]), max_new_tokens=2, exit="kl:1e-3")
    with pytest.raises(ValueError, match="exit gate"):
        load_pair(runs, "bptt")[1].generate(torch.tensor([[3, 4]]), max_new_tokens=2, exit="gate:0.5")
    with pytest.raises(ValueError, match="expected kl:EPS"):
        load_pair(runs, "bptt")[1].generate(torch.tensor([[3, 4]]), max_new_tokens=2, exit="kl")
    with pytest.raises(ValueError, match="sequence-recurrent"):
        load_pair(runs, "joint")[1].generate(torch.tensor([[3, 4]]), max_new_tokens=2, exit="kl:1e-3")
    with pytest.raises(ValueError, match="last-loop cache applies"):
        load_pair(runs, "diffusion")[1].generate(torch.tensor([[3, 4]]), max_new_tokens=2, last_loop_cache=True)


SAMPLER_SETTINGS = [("diffusion", {"solver": "heun", "grid": "karras", "grid_sigma_last": "0.5"}),
                    ("diffusion", {"grid": "geometric"}), ("joint", {"wavefront": "0"}),
                    ("joint", {"solver": "ancestral", "grid": "karras"}),
                    ("joint", {"grid_sigma_last": "0.5", "estimate": "argmax"})]


@pytest.mark.parametrize("objective, settings", SAMPLER_SETTINGS)
def test_sampler_settings_are_call_arguments(runs, data_dir, objective, settings):
    """Logits and sampled tokens as loopdb's run with the setting changed: the solver, the grid, where the
    grid ends (for a sequence-joint model also where the known positions sit), the estimate, the wavefront."""
    from loopdb.readouts import scoring
    from loopdb.readouts.generation import generate
    from loopdb.runs.folder import load_model

    run, _ = runs[objective]
    exported = load_pair(runs, objective)[1]
    model = load_model(run, sampler=settings)[0]
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        ours = scoring.predictive_distribution(model, inputs, 3, 3, [torch.Generator().manual_seed(0) for _ in range(2)])
        theirs = exported(inputs, num_loops=3, **settings).logits
        default = exported(inputs, num_loops=3).logits
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=0) and not torch.allclose(default, ours, atol=ATOL, rtol=0)
    prompt = [3, 100, 200, 17]
    generated = exported.generate(torch.tensor([prompt]), max_new_tokens=12, num_loops=3, noise_seed=2, do_sample=True,
                                  **settings)[0, 4:].tolist()
    assert generated == generate(model, prompt, 12, 3, seed=2)
    with pytest.raises(ValueError, match="solver='rk4'"):
        exported(inputs, solver="rk4")
    if objective == "joint":
        with pytest.raises(ValueError, match="euler or ancestral"):
            exported(inputs, solver="heun")


def test_a_stopped_row_is_padded_and_generation_ends_when_all_stop(runs):
    exported = load_pair(runs, "dense")[1]
    prompt = torch.tensor([[3, 100, 200], [3, 101, 201]])
    free = exported.generate(prompt, max_new_tokens=6)

    def stop_first_row_after_two(ids, scores):  # lm-eval's stop strings answer per row like this
        return torch.tensor([ids.shape[1] >= 5, False])

    ids = exported.generate(prompt, max_new_tokens=6, stopping_criteria=stop_first_row_after_two, pad_token_id=0)
    assert torch.equal(ids[0, :5], free[0, :5]) and (ids[0, 5:] == 0).all()
    assert torch.equal(ids[1], free[1])
    assert exported.generate(prompt, max_new_tokens=6, stopping_criteria=lambda ids, scores: True).shape[1] == 4


@pytest.mark.parametrize("num_loops", [1, 4])
def test_a_task_run_exports_with_its_word_tokenizer(depth_run, num_loops, capsys):
    """Logits as loopdb's scoring readout, greedy tokens as `loopdb sample`, words as the task's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopdb.cli import main
    from loopdb.data.storage import load_tokenizer
    from loopdb.readouts import scoring
    from loopdb.runs.folder import load_model, run_data_dir

    run, out = depth_run
    model = load_model(run)[0]
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer, words = AutoTokenizer.from_pretrained(out), load_tokenizer(run_data_dir(run))
    prompt = " 201 120 012 210\n 021 102"
    assert tokenizer.encode(prompt, add_special_tokens=False) == words.encode(prompt)
    inputs = tokenizer([prompt] * 2, return_tensors="pt").input_ids  # opened as the run was trained
    with torch.no_grad():
        ours = scoring.predictive_distribution(model, inputs, num_loops, 4,
                                               [torch.Generator().manual_seed(0) for _ in range(2)])
        assert torch.allclose(exported(inputs, num_loops=num_loops).logits, ours, atol=ATOL, rtol=0)
        if getattr(model, "opener", None) is not None:  # the held prompt is what makes them equal
            unheld = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, prompt_openers=[]).eval()
            assert not torch.allclose(unheld(inputs, num_loops=num_loops).logits, ours, atol=ATOL, rtol=0)
        if getattr(getattr(model, "diffusion", None), "state_input", "unit") == "wiener":  # and so is reading the states as the run was trained
            unit = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, state_input="unit").eval()
            assert not torch.allclose(unit(inputs, num_loops=num_loops).logits, ours, atol=ATOL, rtol=0)
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0", "--loops", str(num_loops),
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    expected = capsys.readouterr().out[:-1]
    opened = tokenizer(prompt, return_tensors="pt").input_ids  # a run trained with start_token: the newline first
    assert opened[0, 0] == words.newline_id if model.config.start_token else opened.equal(inputs[:1])
    ids = exported.generate(opened, max_new_tokens=8, num_loops=num_loops)
    assert prompt + tokenizer.decode(ids[0, opened.shape[1]:], skip_special_tokens=False) == expected


def test_a_character_tokenizer_converts(tmp_path):
    from loopdb.data.tokenizers import CharTokenizer
    from loopdb.export.tokenizer import char_tokenizer

    ours = CharTokenizer("\nab c!\u00e9")
    char_tokenizer(ours.alphabet).save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["ab c\n!\u00e9", "  a\n\n"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "joint", "draft"])
def test_bfloat16_weights_run_with_float32_sampler_states(runs, data_dir, objective):
    from transformers import AutoModelForCausalLM

    exported = load_pair(runs, objective)[1]
    half = AutoModelForCausalLM.from_pretrained(runs[objective][1], trust_remote_code=True, dtype=torch.bfloat16)
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        probabilities = half(inputs, num_loops=3).logits.float().exp()
        assert torch.allclose(probabilities, exported(inputs, num_loops=3).logits.exp(), atol=2e-2)
    assert half.generate(inputs[:1, :4], num_loops=3).shape == (1, 4 + 64)  # generation_config: 64 new tokens


# -- the folder ------------------------------------------------------------------------------------------------------
def test_the_tokenizer_encodes_the_play_as_loopdbs(runs, data_dir):
    from transformers import AutoTokenizer

    from loopdb.data.storage import load_tokenizer, load_tokens

    ours = load_tokenizer(data_dir)
    theirs = AutoTokenizer.from_pretrained(runs["dense"][1])
    text = ours.decode(load_tokens(data_dir, "test")[:6000])
    for sample in [text, "Hello  world,\n\tthe 1234 end.", "   x\t\ty  ", "é ü 日本 \U0001F600", "\n\nA"]:
        assert theirs.encode(sample, add_special_tokens=False) == ours.encode(sample)
        assert theirs.decode(ours.encode(sample), skip_special_tokens=False) == sample


def test_the_folder_holds_what_a_hub_model_holds(runs):
    out = runs["diffusion"][1]
    names = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md", "hf_modeling.py", "hf_layers.py", "hf_generation.py", "hf_joint.py", "hf_configuration.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "hf_modeling.LoopDBForCausalLM"
    card = (out / "README.md").read_text()
    assert "num_loops" in card and "| 1 |" in card and "lm_eval --model hf" in card
    for name in ("hf_modeling.py", "hf_layers.py", "hf_generation.py", "hf_joint.py",
                 "hf_configuration.py"):  # torch + transformers only
        imports = [line.split()[1] for line in (out / name).read_text().splitlines()
                   if line.startswith(("import ", "from "))]
        assert all(module.split(".")[0] in ("__future__", "math", "statistics", "torch", "transformers", "")
                   for module in imports), imports


def test_the_export_loads_where_loopdb_is_not_importable(runs, data_dir, tmp_path):
    out = runs["diffusion"][1]
    inputs = play_windows(data_dir, 1, 16)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["loopdb"] = None  # any import of loopdb fails
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        inputs = torch.tensor({inputs.tolist()})
        torch.save(model(inputs, num_loops=2).logits, {str(tmp_path / "logits.pt")!r})
        print(tokenizer.decode(model.generate(inputs[:, :4], max_new_tokens=5, num_loops=2)[0]))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = load_pair(runs, "diffusion")[1]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), exported(inputs, num_loops=2).logits)


@pytest.mark.parametrize("objective", ["diffusion", "bptt", "stacked-diffusion", "joint", "draft"])
def test_save_pretrained_round_trips_unchanged(runs, data_dir, tmp_path, objective):
    from transformers import AutoModelForCausalLM

    exported = load_pair(runs, objective)[1]
    exported.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    def settings(model):
        return {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}

    assert settings(again) == settings(exported)
    first, second = exported.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    inputs = play_windows(data_dir, 2, 16)
    with torch.no_grad():
        assert torch.equal(again(inputs).logits, exported(inputs).logits)


def test_export_refuses_what_it_cannot_write(runs, tmp_path):
    from loopdb.config import preset
    from loopdb.errors import UsageError
    from loopdb.export import export_run, hf_config_values

    with pytest.raises(UsageError, match="not empty"):
        export_run(runs["dense"][0], runs["dense"][1])
    for name, message in (("tiny-mdm", "family 'mdm'"), ("tiny-vit", "family 'vit'")):
        with pytest.raises(UsageError, match=message):
            hf_config_values(preset(name))


# -- lm-eval -----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def offline_hf(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    for key, value in {"HF_HOME": tmp_path / "hf", "HF_DATASETS_CACHE": tmp_path / "hf" / "datasets",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))


def _lm_eval(model, model_args, tasks, limit):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import loopdb.evaluation.lm_eval_model  # noqa: F401  (registers the loopdb model)

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
                              bootstrap_iters=0, batch_size=4, device="cpu")["results"]
    return {(task, metric.split(",")[0]): value for task, metrics in results.items()
            for metric, value in metrics.items() if isinstance(value, float) and "stderr" not in metric}


@pytest.mark.slow
@pytest.mark.parametrize("objective, num_loops", [("dense", 1), ("diffusion", 2), ("bptt", 2), ("ouro", 2),
                                                      ("stacked-diffusion", 2), ("joint", 2), ("draft-anchor", 2)])
def test_lm_eval_hf_scores_the_export_as_lm_eval_loopdb_scores_the_run(data_dir, tmp_path, offline_hf, objective,
                                                                       num_loops):
    """The likelihood tasks, 10 documents each, at a loop count other than the export's default (4), so
    the model arg must reach the model. The dense model draws no noise: the same numbers
    (1e-6 relative). The others draw their initial states from differently seeded generators (loopdb's
    own lm-eval model seeds each window by its tokens; the export seeds each row by ``noise_seed``:
    lm-eval's hf model passes it no attention mask to find a row's length), so the numbers agree up to
    the spread of 3 noise draws: bits per byte within 1% relative, the perplexities (its powers) within
    5%, accuracies within 0.1 (one document of 10). The generation task is left out: loopdb's model
    generates in chunks of 16 tokens with the prompt truncated to context - 16, lm-eval's hf model
    truncates it to context - max_gen_toks. A 64-token window: lm-eval's hf model refuses a
    continuation longer than the window (a cloze line), which loopdb's scores in several windows.
    ``draft-anchor``: a drafting run under its anchor readout on both sides, which draws no noise either."""
    tasks = ["shakespeare_bpb", "shakespeare_cloze"]
    name = objective.removesuffix("-anchor")
    readout = ",readout=anchor" if name != objective else ""
    run, out = train_and_export(data_dir, tmp_path, name, "--context=64")
    ours = _lm_eval("loopdb", f"run={run},num_loops={num_loops},samples=3{readout}", tasks, limit=10)
    theirs = _lm_eval("hf", f"pretrained={out},trust_remote_code=True,num_loops={num_loops}{readout}", tasks, limit=10)
    assert ours.keys() == theirs.keys() and len(ours) >= 5
    for (task, metric), value in ours.items():
        if objective in ("dense", "draft-anchor"):
            expected = pytest.approx(value, rel=1e-6)
        elif metric == "bits_per_byte":
            expected = pytest.approx(value, rel=1e-2)
        elif metric.endswith("perplexity"):
            expected = pytest.approx(value, rel=5e-2)
        else:
            expected = pytest.approx(value, abs=0.1)
        assert theirs[task, metric] == expected, (task, metric)
