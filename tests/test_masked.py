"""The masked diffusion LM (loopdb.models.masked, objectives.masked, readouts.masked; docs/method.md#masked-diffusion): ELBO, partition, block locality, sampler, CLI."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_only_block_has_gradients
from loopdb.data.preparation import prepare
from loopdb.data.storage import CHAR_TOKENIZER_FILE, META_FILE, SPLITS, load_tokenizer, load_tokens
from loopdb.data.tokenizers import CharTokenizer
from loopdb.data.windows import eval_windows
from loopdb.errors import DataError
from loopdb.maths.partition import BlockPartition, time_boundaries
from loopdb.models import masked as masked_model
from loopdb.objectives import masked as masked_objectives
from loopdb.readouts import masked as masked_readouts
from loopdb.config import ConfigError, DiffusionConfig, ModelConfig, preset
from loopdb.families import check_config
from loopdb.models.masked import MaskedDiffusionLM
from loopdb.objectives.masked import make_masked_objective
from loopdb.sampling.masked import sample_masked

VOCAB = 23


def tiny_mdm(objective="diffusion", seed=0, n_layers=3, num_blocks=3, **model_keys) -> MaskedDiffusionLM:
    """A small masked diffusion LM with non-zero adaLN, so t and every layer matter."""
    torch.manual_seed(seed)
    config = ModelConfig(family="mdm", vocab_size=VOCAB, context=12, d_model=32, n_heads=4, n_layers=n_layers,
                         num_blocks=num_blocks, **model_keys)
    model = MaskedDiffusionLM(config, DiffusionConfig(), blockwise=objective == "diffusion")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0, 0.05)
    return model.eval()


# -- the ELBO -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["diffusion", "dense"])
def test_elbo_of_a_uniform_model_is_exactly_L_log_V(objective):
    model = tiny_mdm(objective, tie_head=False)
    with torch.no_grad():
        model.head.weight.zero_()  # logits 0: uniform over the vocabulary at every position
    windows = torch.randint(VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))
    for t_samples in (1, 7, 16):
        nats = masked_readouts.elbo_nats(model, windows, t_samples, torch.Generator().manual_seed(t_samples))
        torch.testing.assert_close(nats, torch.full((5,), 12 * math.log(VOCAB), dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    token_bytes = torch.arange(VOCAB) % 3 + 1
    result = masked_readouts.elbo_bits_per_byte(model, list(windows) + [windows[0, :7]], token_bytes, batch_size=2)
    assert result["tokens"] == 5 * 12 + 7
    assert result["bytes"] == int(token_bytes[windows].sum() + token_bytes[windows[0, :7]].sum())
    assert result["bpb"] == pytest.approx(67 * math.log(VOCAB) / math.log(2) / result["bytes"], rel=1e-6)


class _CountingModel(torch.nn.Module):
    """Logits that depend on t and on how many positions are masked, not on a block."""

    def __init__(self, length):
        super().__init__()
        self.mask_id, self.length = VOCAB, length
        self.table = torch.randn(length, VOCAB, generator=torch.Generator().manual_seed(3))
        self.blockwise = False  # every layer at every t (the dense baseline's wiring)

    def forward(self, tokens, t, block_index=None):
        share = (tokens == self.mask_id).float().mean(1)  # (B,)
        return self.table[None] * (1 + 2 * t[:, None, None]) * (0.5 + share[:, None, None])


def test_elbo_estimator_is_unbiased_for_the_md4_bound():
    """The (L/m)-weighted estimator against the defining integral
    int_0^1 (1/t) sum_mask t^m (1-t)^(L-m) sum_masked CE(t, mask) dt, enumerated exactly."""
    length = 4
    model = _CountingModel(length)
    x = torch.tensor([[3, 7, 0, 21]])
    log_probs = lambda t, mask: torch.log_softmax(  # noqa: E731
        model(x.masked_fill(mask, VOCAB), torch.tensor([t])), -1)[0].gather(-1, x[0, :, None])[:, 0]
    grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    exact = 0.0
    for bits in range(1, 2**length):
        mask = torch.tensor([[(bits >> i) & 1 == 1 for i in range(length)]])
        m = int(mask.sum())
        integrand = [t ** (m - 1) * (1 - t) ** (length - m) * float(-(log_probs(float(t), mask) * mask[0]).sum())
                     for t in grid[::20]]  # smooth in t: 200 midpoints suffice
        exact += float(np.mean(integrand))
    draws = masked_readouts.elbo_nats(model, x.expand(4000, -1), 16, torch.Generator().manual_seed(0))
    assert draws.mean().item() == pytest.approx(exact, rel=0.01)
    assert draws.std().item() / math.sqrt(4000) < 0.003 * exact  # so the check above is sharp


# -- the partition of t ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5])
def test_partition_gives_equal_alpha_mass_and_block_zero_the_most_masked_range(num_blocks):
    boundaries = time_boundaries(num_blocks)
    assert boundaries[0] == 0 and boundaries[-1] == 1
    decrements = [masked_model.alpha(boundaries[b]) - masked_model.alpha(boundaries[b + 1]) for b in range(num_blocks)]
    assert decrements == pytest.approx([1 / num_blocks] * num_blocks)
    ranges = [BlockPartition(boundaries, log=False).training_range(b) for b in range(num_blocks)]
    assert ranges[0][1] == 1.0 and ranges[-1][0] == 0.0
    assert all(ranges[b][0] == ranges[b + 1][1] for b in range(num_blocks - 1))  # top down, contiguous
    for b, (lo, hi) in enumerate(ranges):
        for t in (hi, (lo + hi) / 2, lo + 1e-9):
            assert BlockPartition(boundaries, log=False).owner(t) == b
    assert BlockPartition(boundaries, log=False).owner(0.0) == num_blocks - 1


def test_overlap_widens_each_range_per_side_and_times_stay_inside():
    boundaries = time_boundaries(4)
    assert BlockPartition(boundaries, 0.1, log=False).training_range(1) == pytest.approx((0.5 - 0.025, 0.75 + 0.025))
    assert BlockPartition(boundaries, 0.1, log=False).training_range(0) == pytest.approx((0.75 - 0.025, 1.0))  # clipped at 1
    times = masked_objectives.stratified_times(64, 0.25, 0.5, torch.Generator().manual_seed(0))
    assert 0.25 < times.min() and times.max() <= 0.5
    assert np.histogram(times.numpy(), bins=4, range=(0.25, 0.5))[0].tolist() == [16] * 4  # stratified


# -- DiffusionBlocks training: block locality ------------------------------------------------------------
def test_only_the_sampled_block_gets_gradients_and_reads_the_masked_embedding():
    model = tiny_mdm(n_layers=6, num_blocks=3).train()
    tokens = torch.randint(VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    seen = set()
    for seed in range(12):
        model.zero_grad(set_to_none=True)
        loss, stats = make_masked_objective("diffusion").loss(model, tokens, torch.Generator().manual_seed(seed))
        loss.backward()
        block = int(stats["block"])
        seen.add(block)
        assert_only_block_has_gradients(
            [[p for layer in model.block_layers(index) for p in layer.parameters()] for index in range(3)], block)
        assert model.embedding.weight.grad is not None and model.time_embedder.mlp[0].weight.grad is not None
        # the block's input is the masked embedding: other blocks' weights cannot change its loss
        other = model.block_layers((block + 1) % 3)[0]
        with torch.no_grad():
            saved = other.mlp.fc.weight.clone()
            other.mlp.fc.weight.add_(1.0)
            again, _ = make_masked_objective("diffusion").loss(model, tokens, torch.Generator().manual_seed(seed))
            other.mlp.fc.weight.copy_(saved)
        assert torch.equal(again, loss.detach())
    assert seen == {0, 1, 2}


def test_training_times_fall_in_the_sampled_blocks_range(monkeypatch):
    model = tiny_mdm(n_layers=6, num_blocks=3)
    calls = []
    monkeypatch.setattr(model, "forward", lambda tokens, t, block: calls.append((block, t)) or
                        torch.zeros(*tokens.shape, VOCAB, requires_grad=True))
    for seed in range(10):
        make_masked_objective("diffusion").loss(model, torch.zeros(8, 12, dtype=torch.long),
                                                torch.Generator().manual_seed(seed))
    for block, t in calls:
        lo, hi = model.partition.training_range(block)
        assert lo < t.min() and t.max() <= hi
    dense = tiny_mdm("dense")
    loss, _ = make_masked_objective("dense").loss(dense.train(), torch.zeros(8, 12, dtype=torch.long), torch.Generator())
    loss.backward()
    assert all(p.grad is not None for p in dense.parameters())  # end to end: every layer, every t


def test_md4_loss_weights_masked_cross_entropy_by_one_over_t():
    model = tiny_mdm("dense", tie_head=False)
    with torch.no_grad():
        model.head.weight.zero_()
    tokens = torch.zeros(64, 12, dtype=torch.long)
    t = torch.full((64,), 0.25)
    loss, masked_ce = masked_objectives.md4_loss(model, tokens, t, None, torch.Generator().manual_seed(0))
    assert masked_ce.item() == pytest.approx(math.log(VOCAB), rel=1e-5)  # uniform: log V per masked token
    assert loss.item() == pytest.approx(math.log(VOCAB), rel=0.15)  # (1/t) E[#masked] / L = 1


# -- the sampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3, 40])
def test_sampler_unmasks_everything_and_keeps_the_prompt(steps):
    model = tiny_mdm(n_layers=6, num_blocks=3)
    ids = sample_masked(model, 12, steps, prompt=[5, 6, 7], num_samples=3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 12)
    assert not (ids == model.mask_id).any()
    assert (ids[:, :3] == torch.tensor([5, 6, 7])).all()
    assert ids.max() < VOCAB


def test_each_sampler_step_runs_the_block_that_owns_its_t(monkeypatch):
    model = tiny_mdm(n_layers=6, num_blocks=3)
    original, calls = model.forward, []

    def spy(tokens, t, block_index=None):
        calls.append((float(t[0]), block_index))
        return original(tokens, t, block_index)

    monkeypatch.setattr(model, "forward", spy)
    sample_masked(model, 12, 6, num_samples=16)  # a position stays masked to the last step with chance 1/6
    assert [t for t, _ in calls] == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert [block for _, block in calls] == [0, 0, 1, 1, 2, 2]  # a boundary t = b/B goes to the lower block


# -- config, data and CLI ---------------------------------------------------------------------------
def test_config_rejects_what_the_mdm_family_cannot_do():
    with pytest.raises(ConfigError, match="objective diffusion"):
        check_config(preset("tiny-mdm").apply_overrides({"objective": "bptt"}))
    with pytest.raises(ConfigError, match="multiple of num_blocks"):
        preset("tiny-mdm").apply_overrides({"n_layers": "5"})
    with pytest.raises(ConfigError, match="block_overlap"):
        preset("tiny-mdm").apply_overrides({"block_overlap": "-0.1"})


def test_char_tokenizer_round_trips_and_counts_bytes(tmp_path):
    texts = {"a.txt": "First line.\nSecond, é!\n\n", "b.txt": "Third\tpart\n\n", "c.txt": "zz~ end\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    meta = prepare(tmp_path / "out", corpus=[tmp_path / n for n in texts], tokenizer="char",
                   show_progress=False)
    tokenizer = load_tokenizer(tmp_path / "out")
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {META_FILE, CHAR_TOKENIZER_FILE} | {f"{split}-00000.bin" for split in SPLITS}
    assert isinstance(tokenizer, CharTokenizer) and meta["vocab_size"] == tokenizer.vocab_size
    assert tokenizer.vocab_size == len(set("".join(texts.values())))
    for split in SPLITS:
        ids = load_tokens(tmp_path / "out", split)
        assert meta["splits"][split]["tokens"] == len(tokenizer.decode(ids))  # one id per character
        assert int(tokenizer.token_bytes[np.asarray(ids)].sum()) == meta["splits"][split]["bytes"]
    text = "".join(texts.values())
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(DataError, match="alphabet"):
        tokenizer.encode("Q")


def test_tiled_windows_score_every_token_once():
    tokens = np.arange(50, dtype=np.uint16)
    windows = eval_windows(tokens, 16, overlap=0)
    assert torch.equal(torch.cat(windows), torch.arange(50))
    assert [len(w) for w in windows] == [16, 16, 16, 2]


def test_cli_trains_scores_and_samples_an_mdm_run(data_dir, tmp_path, capsys):
    from loopdb.cli import main

    run = tmp_path / "mdm"
    assert main(["train", "--preset", "tiny-mdm", "--data", str(data_dir), "--out", str(run), "--quiet",
                 "--context=16", "--d_model=32", "--n_heads=4", "--n_layers=2", "--num_blocks=2", "--batch_size=4",
                 "--max_steps=3", "--warmup_steps=1", "--eval_windows=2"]) == 0
    capsys.readouterr()
    argv = ["score", str(run), "--split", "test", "--max-windows", "6", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["bpb"]) == {"elbo"} and set(report["bpc"]) == {"elbo"}
    assert 0 < report["bpb"]["elbo"] < 30 and math.isfinite(report["bpc"]["elbo"])
    assert report["t_samples"] == masked_readouts.ELBO_T_SAMPLES and report["windows"] == 6
    assert report["objective"] == "diffusion" and report["readout"] == "elbo" and report["split"] == "test"
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] == report["bpb"]  # fixed seed: same number
    assert main(argv + ["--t-samples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["t_samples"] == 4
    assert main(["sample", str(run), "--prompt", "KING.", "--max-new-tokens", "8", "--steps", "4"]) == 0
    assert capsys.readouterr().out.startswith("KING.")
    assert main(["score", str(run), "--grid=karras"]) == 2
    assert main(["sample", str(run), "--max-new-tokens", "17"]) == 2
