"""The stacked LM in B DiffusionBlocks (docs/method.md#stacked-lm): block-wise training, layout, inference."""

import pytest
import torch

from conftest import VOCAB, assert_only_block_has_gradients, torchrun
from loopdb.readouts import scoring as engine
from loopdb.readouts import generation
from loopdb.config import Config, ModelConfig
from loopdb.maths.edm import precondition, sigma_grid
from loopdb.families import build_model, family_of
from loopdb.training.trainer import make_optimizer

D_MODEL = 32


def stacked_config(objective="diffusion", **train) -> Config:
    config = Config()
    config.model = ModelConfig(family="stacked", vocab_size=VOCAB, context=16, d_model=D_MODEL, n_heads=4,
                               n_layers=4, num_blocks=2)
    config.train.objective = objective
    for key, value in train.items():
        setattr(config.train, key, value)
    config.validate()
    return config


def stacked_model(seed=0, objective="diffusion", **train):
    """A tiny stacked model with non-zero adaLN and denoiser outputs, so every path carries signal."""
    torch.manual_seed(seed)
    model = build_model(stacked_config(objective, **train))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name or "denoiser_out" in name:
                parameter.normal_(0, 0.05)
    return model


def stacked_objective(objective="diffusion", **train):
    """The loss the family trains the model with (the model holds none)."""
    config = stacked_config(objective, **train)
    return family_of(config).objective(config)


def tokens(batch=2, length=13, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_only_the_sampled_block_gets_gradients_and_optimizer_state():
    model = stacked_model().train()
    optimizer = make_optimizer(model, stacked_config())
    seen = set()
    for step in range(6):
        loss, stats = stacked_objective().loss(model, tokens(4, 17, step),
                                                torch.Generator().manual_seed(step))
        block = int(stats["block"])
        seen.add(block)
        loss.backward()
        assert_only_block_has_gradients([list(b.parameters()) for b in model.blocks], block)
        assert all(p.grad is not None for p in model.shared_parameters() if p is not model.sigma_embedder)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state_blocks = {index for index, b in enumerate(model.blocks) if any(p in optimizer.state for p in b.parameters())}
        assert state_blocks == seen  # state exists only for blocks trained so far
    assert seen == {0, 1}  # uniform sampling reaches both blocks in 6 steps


def test_a_run_training_one_block_has_no_optimizer_state_or_group_for_the_others():
    config = stacked_config(train_blocks=(1,))
    model = stacked_model(train_blocks=(1,)).train()
    optimizer = make_optimizer(model, config)
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_groups for p in model.block_parameters(0))
    assert all(id(p) in in_groups for p in model.block_parameters(1) + model.shared_parameters())
    for step in range(3):
        loss, stats = stacked_objective(train_blocks=(1,)).loss(model, tokens(4, 17, step),
                                                                torch.Generator().manual_seed(step))
        assert int(stats["block"]) == 1
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None and p not in optimizer.state for p in model.block_parameters(0))
    assert all(p in optimizer.state for p in model.block_parameters(1))


def test_training_sigmas_come_from_the_sampled_block_range(monkeypatch):
    model = stacked_model().train()
    seen = []
    original = model.denoise_block

    def spy(block_index, z, sigma, context):
        seen.append((block_index, sigma))
        return original(block_index, z, sigma, context)

    monkeypatch.setattr(model, "denoise_block", spy)
    for step in range(4):
        stacked_objective().loss(model, tokens(8, 9, step), torch.Generator().manual_seed(step))
    for block_index, sigma in seen:
        lo, hi = model.block_range(block_index)
        assert lo <= float(sigma.min()) and float(sigma.max()) <= hi
    assert model.block_range(0)[1] == model.schedule.sigma_max  # block 0 (input side) owns the highest range


def test_a_block_input_is_the_noisy_embedding_never_an_earlier_block_output():
    model = stacked_model()
    x, z = tokens(1, 10), torch.randn(1, 10, D_MODEL) * 0.3
    sigma = 0.05  # owned by the last block
    assert model.block_for_sigma(sigma) == 1
    inputs = []
    handle = model.blocks[1].layers[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]) and None)
    base = model.denoise(z, sigma, model.encode(x))
    handle.remove()
    pre = precondition(torch.tensor([sigma]), model.sigma_data)
    clean, noisy = inputs
    assert torch.equal(clean, model.embedding(x))  # the clean stream starts from e, not from block 0
    assert torch.allclose(noisy, model.blocks[1].inject(pre.c_in[:, None, None] * z, model.embedding(x)), atol=1e-6)
    # block 0's weights do not reach block 1's output at all
    with torch.no_grad():
        for parameter in model.blocks[0].parameters():
            parameter.add_(torch.randn_like(parameter))
    assert torch.allclose(model.denoise(z, sigma, model.encode(x)), base, atol=1e-6)


def test_masked_out_keys_change_nothing():
    """Perturb a key the mask hides (docs/method.md#pitfall-2): noisy row t sees clean rows <= t and itself."""
    model = stacked_model()
    x, z = tokens(1, 12), torch.randn(1, 12, D_MODEL) * 0.3
    for sigma in (20.0, 0.01):  # each block
        base = model.denoise(z, sigma, model.encode(x))
        changed_x = x.clone()
        changed_x[0, 8] = (x[0, 8] + 1) % VOCAB
        out = model.denoise(z, sigma, model.encode(changed_x))
        assert torch.allclose(out[:, :8], base[:, :8], atol=1e-6)
        assert (out[:, 8:] - base[:, 8:]).abs().max() > 1e-5
        changed_z = z.clone()
        changed_z[0, 5] += 3.0
        out = model.denoise(changed_z, sigma, model.encode(x))
        others = [t for t in range(12) if t != 5]
        assert torch.allclose(out[:, others], base[:, others], atol=1e-6)
        assert (out[:, 5] - base[:, 5]).abs().max() > 1e-5


def test_b_steps_run_each_block_once_in_order(monkeypatch):
    model = stacked_model()
    calls = []
    original = model.denoise_block
    monkeypatch.setattr(model, "denoise_block", lambda b, *args: calls.append(b) or original(b, *args))
    engine.next_token_logprobs(model, tokens(1, 6), 2, torch.Generator().manual_seed(0))
    assert calls == [0, 1]
    calls.clear()
    engine.next_token_logprobs(model, tokens(1, 6), 5, torch.Generator().manual_seed(0))
    assert calls == [model.block_for_sigma(s) for s in sigma_grid(5, model.schedule)] and calls[0] == 0


def test_cached_and_uncached_generation_agree():
    for objective in ("diffusion", "dense"):
        model = stacked_model(objective=objective).eval()
        prompt = tokens(1, 5)[0].tolist()
        cached = generation.generate(model, prompt, 25, 2, seed=3, top_k=20)  # 30 > context 16: the window slides
        assert cached == generation.generate(model, prompt, 25, 2, seed=3, top_k=20, use_cache=False)


def test_dense_baseline_chains_the_blocks_and_trains_them_all():
    model = stacked_model(objective="dense").train()
    loss, _ = stacked_objective("dense").loss(model, tokens(4, 17), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for block in model.blocks for p in block.layers.parameters())
    # block 1's clean stream reads block 0's output: changing block 0 changes the logits
    x = tokens(1, 8)
    base = model.dense_logits(model.encode(x))
    with torch.no_grad():
        model.blocks[0].layers[0].mlp.proj.weight.add_(0.5)
    assert not torch.allclose(model.dense_logits(model.encode(x)), base, atol=1e-4)


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = stacked_model(checkpointing=checkpointing).train()
        loss, _ = stacked_objective().loss(model, tokens(2, 9), torch.Generator().manual_seed(1))
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_cli_trains_scores_and_samples_a_stacked_run(capsys, monkeypatch, data_dir, tmp_path):
    import json

    from conftest import SMALL_RUN
    from loopdb.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-stacked", "--data", str(data_dir), "--out", str(run), "--quiet",
                 *SMALL_RUN, "--max_steps=3", "--n_layers=4", "--num_blocks=2", "--train_blocks=1"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["step"] == 3
    assert main(["score", str(run), "--loops", "1,2", "--samples", "2", "--max-windows", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["bpb"]) == {"1", "2"} and all(0 < v < 20 for v in report["bpb"].values())
    assert main(["sample", str(run), "--loops", "2", "--prompt", "KING:", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("KING:")
    steps = []  # by default a stacked model samples with T = B steps
    monkeypatch.setattr(generation, "generate", lambda model, prompt, count, loops, **kw: steps.append(loops) or [1])
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 0 and steps == [2]


# -- memory benchmark ------------------------------------------------------------------------------
TINY_BENCH = {"vocab_size": 64, "context": 8, "d_model": 32, "n_heads": 4, "n_layers": 8}


def test_bench_memory_measures_a_process_that_holds_one_block_only():
    from loopdb.evaluation.bench import measure

    e2e, b4 = measure("e2e", "cpu", TINY_BENCH), measure("diffusion_b4", "cpu", TINY_BENCH)
    assert e2e["parameters_trained"] == e2e["parameters_held"]
    assert b4["parameters_trained"] == b4["parameters_held"]  # no weights of the blocks it does not train
    per_block = (e2e["parameters_held"] - b4["parameters_held"]) / 3  # the three blocks b4 does not hold
    assert per_block > 0 and b4["parameters_held"] - per_block < per_block  # shared parts smaller than a block
    for result in (e2e, b4):
        assert result["peak_mb"] >= result["baseline_mb"] > 0 and result["measure"] == "ru_maxrss"


@pytest.mark.slow
def test_bench_memory_json_meets_the_target(capsys):
    """The real bench, each config in its own process (about 2 minutes on one core)."""
    import json

    from loopdb.evaluation.bench import CONFIGS
    from loopdb.cli import main

    assert main(["bench", "memory", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["configs"]] == list(CONFIGS)
    assert set(report["ratios"]) == {"diffusion_b4_vs_e2e", "diffusion_b2_vs_e2e", "diffusion_b4_vs_e2e_checkpointed"}
    by_name = {c["name"]: c for c in report["configs"]}
    assert report["ratios"]["diffusion_b4_vs_e2e"] == pytest.approx(
        by_name["diffusion_b4"]["peak_mb"] / by_name["e2e"]["peak_mb"], abs=1e-3)
    assert all(c["peak_mb"] > c["baseline_mb"] > 0 for c in report["configs"])
    assert report["ratios"]["diffusion_b4_vs_e2e"] <= 0.40


# -- several processes (torchrun, gloo) ---------------------------------------------------------
def two_block_run(**extra):
    from conftest import SMALL_RUN

    keys = {"n_layers": 4, "num_blocks": 2, "max_steps": 3, "eval_every": 100, "checkpoint_every": 100, **extra}
    return [*SMALL_RUN, *[f"--{k}={v}" for k, v in keys.items()]]


def test_a_model_holding_one_block_has_that_block_as_the_full_model_has_it():
    from loopdb.families.text import build_stacked

    config = stacked_config()
    torch.manual_seed(0)
    full = build_stacked(config)
    torch.manual_seed(0)
    partial = build_stacked(config, held_blocks=(1,))
    assert not partial.blocks[0].held and partial.blocks[1].held
    assert all(p.is_meta for p in partial.blocks[0].parameters())
    for (name, a), b in zip(full.blocks[1].state_dict().items(), partial.blocks[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(full.embedding.weight, partial.embedding.weight)


def test_block_parallel_on_two_processes_equals_training_the_blocks_one_after_another(capsys, data_dir, tmp_path):
    """Shared parameters frozen (train_shared=false), so each block's trajectory depends on itself only."""
    from loopdb.runs.folder import load_model
    from loopdb.cli.args import parse_overrides
    from loopdb.config import preset
    from loopdb.training.trainer import Trainer

    argv = two_block_run(train_shared="false")
    train_on_two_processes(data_dir, tmp_path / "parallel", "--block-parallel", *argv)
    assembled, _ = load_model(tmp_path / "parallel")
    overrides = parse_overrides(argv)
    initial = None
    for block in (0, 1):
        config = preset("tiny-stacked").apply_overrides({**overrides, "train_blocks": str(block)})
        trainer = Trainer(config, data_dir, tmp_path / f"block{block}", progress=False, log_tensorboard=False)
        initial = initial or {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for _ in range(3):
            trainer.train_step()
        for key, value in trainer.model.blocks[block].state_dict().items():
            assert torch.allclose(assembled.blocks[block].state_dict()[key], value, atol=1e-6, rtol=0), key
    state = assembled.state_dict()
    assert not torch.equal(state["blocks.0.layers.0.attn.qkv.weight"], initial["blocks.0.layers.0.attn.qkv.weight"])
    assert torch.equal(state["embedding.weight"], initial["embedding.weight"])  # frozen shared parts
    score_and_sample(capsys, tmp_path / "parallel")  # the assembled checkpoint is a normal run


def score_and_sample(capsys, run):
    import json

    from loopdb.cli import main

    assert main(["score", str(run), "--loops", "2", "--samples", "1", "--max-windows", "2", "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["bpb"]["2"] < 20
    assert main(["sample", str(run), "--loops", "2", "--prompt", "KING:", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


def train_on_two_processes(data_dir, run, *extra) -> dict:
    import json

    result = torchrun("train", "--preset", "tiny-stacked", "--data", data_dir, "--out", run, "--quiet", *extra)
    return json.loads(result.stdout.strip().splitlines()[-1])  # printed once, by rank 0


def test_data_parallel_on_two_processes_trains_scores_and_samples(capsys, data_dir, tmp_path):
    assert train_on_two_processes(data_dir, tmp_path / "ddp", *two_block_run(max_steps=2))["step"] == 2
    score_and_sample(capsys, tmp_path / "ddp")


@pytest.mark.slow
def test_block_parallel_with_shared_parameters_trains_scores_and_samples(capsys, data_dir, tmp_path):
    run = tmp_path / "blocks"
    assert train_on_two_processes(data_dir, run, "--block-parallel", *two_block_run(max_steps=2))["step"] == 2
    score_and_sample(capsys, run)

