"""The minimal Huginn model (loopdb.evaluation.minimal_recurrent) is the same architecture as loopdb's
sequence-recurrent model: same parameters, same function given the same weights, same task batches."""

import pytest
import torch

from loopdb.readouts.scoring import loop_logits
from loopdb.config import preset
from loopdb.evaluation.minimal_recurrent import MinimalRecurrentLM, MinimalSettings, task_batch
from loopdb.families import build_model, check_config
from loopdb.families.reasoning import ReasoningFeed
from loopdb.tasks import IGNORE_INDEX, get_task

# loopdb's parameter names -> the minimal model's (everything else has the same name)
RENAMES = {"injection.": "adapter.", "attn.proj.": "attn.out.", "mlp.fc.": "mlp.0.", "mlp.proj.": "mlp.2."}


def depth_tiny():
    config = preset("depth-tiny")
    config.model.tie_head = True  # the minimal model ties its head; the rest of its layers are loopdb's
    ReasoningFeed(config)  # fills in the task's vocabulary
    return check_config(config)


def minimal_like(config, **settings) -> MinimalRecurrentLM:
    m = config.model
    return MinimalRecurrentLM(MinimalSettings(d_model=m.d_model, n_heads=m.n_heads, n_prelude=m.n_prelude,
                                              n_core=m.n_core, n_coda=m.n_coda, context=m.context, **settings),
                              m.vocab_size)


def renamed(name: str) -> str:
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def test_minimal_model_has_loopdbs_parameters_and_learned_positions_add_one_table():
    config = depth_tiny()
    loopdb_model = build_model(config)
    rotary = minimal_like(config, positions="rotary")
    shapes = {renamed(name): p.shape for name, p in loopdb_model.named_parameters()}
    assert shapes == {name: p.shape for name, p in rotary.named_parameters()}
    learned = minimal_like(config, positions="learned")
    extra = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in rotary.parameters())
    assert extra == config.model.context * config.model.d_model


@pytest.mark.parametrize("embedded_norm", [False, True])
def test_minimal_model_computes_loopdbs_function_from_the_same_weights_and_state(embedded_norm):
    config = depth_tiny()
    config.model.embedded_norm = embedded_norm
    torch.manual_seed(0)
    loopdb_model = build_model(config).eval()
    minimal = minimal_like(config, positions="rotary", embedded_norm=embedded_norm).eval()
    minimal.load_state_dict({renamed(name): value for name, value in loopdb_model.state_dict().items()})
    tokens = torch.randint(config.model.vocab_size, (3, 12))
    state = torch.randn(3, 12, config.model.d_model)
    with torch.no_grad():
        context = loopdb_model.encode(tokens)
        expected = loop_logits(loopdb_model, context, state, 3)
        embedded = minimal.encode(tokens)
        mine = state
        for _ in range(3):
            mine = minimal.recur(mine, embedded)
        got = minimal.readout(mine)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_both_sides_train_on_the_same_task_layout():
    config = depth_tiny()
    loopdb_batch = ReasoningFeed(config).batch(torch.Generator().manual_seed(0), "cpu")
    start = int(config.model.start_token)  # the preset opens every sequence with the newline; so can the minimal model
    inputs, targets = task_batch(get_task("s3"), 12, config.train.batch_size, torch.Generator().manual_seed(0),
                                 start_token=config.model.start_token)
    assert loopdb_batch["inputs"].shape == inputs.shape == (config.train.batch_size, 12 + start)
    assert loopdb_batch["targets"].shape == targets.shape
    # every prefix of the 12 elements is supervised on both sides, with answers from the same vocabulary
    for batch_targets in (targets, loopdb_batch["targets"]):
        assert bool((batch_targets[:, start:] != IGNORE_INDEX).all()) and bool((batch_targets[:, :start] == IGNORE_INDEX).all())
    assert int(targets.max()) < config.model.vocab_size and int(loopdb_batch["targets"].max()) < config.model.vocab_size


def test_the_comparison_trains_both_sides_and_scores_every_loop_count():
    from loopdb.evaluation.bptt_compare import LOOPS, run_loopdb, run_minimal

    for result in (run_loopdb({"batch_size": "4"}, steps=2, seconds=0, count=1),
                   run_minimal({"batch_size": "4", "beta2": "0.95", "warmup_steps": "100"}, steps=2, seconds=0, count=1)):
        assert result["updates"] == 2
        assert sorted(result["scores"]) == sorted(LOOPS)
        assert all(0 <= score["final"] <= 1 and 0 <= score["positions"] <= 1 for score in result["scores"].values())


def test_the_comparison_reads_true_and_false_for_switches_and_refuses_anything_else():
    from loopdb.evaluation import bptt_compare

    with pytest.raises(SystemExit, match="true or false"):
        bptt_compare.run_minimal({"embedded_norm": "yes"}, steps=1, seconds=0, count=1)
    result = bptt_compare.run_minimal({"embedded_norm": "False", "batch_size": "2"}, steps=1, seconds=0, count=1)
    with_norm = bptt_compare.run_minimal({"embedded_norm": "true", "batch_size": "2"}, steps=1, seconds=0, count=1)
    assert with_norm["parameters"] - result["parameters"] == MinimalSettings().d_model  # one RMSNorm weight


def test_minimal_sandwich_blocks_end_at_unit_rms_and_the_mlp_switch_is_checked():
    settings = MinimalSettings(sandwich=True, mlp="swiglu", embedded_norm=False)
    model = MinimalRecurrentLM(settings, vocab_size=10)
    embedded = model.encode(torch.randint(10, (2, 12)))  # the prelude's sandwich block normalizes last
    rms = embedded.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    plain = MinimalRecurrentLM(MinimalSettings(), vocab_size=10).encode(torch.randint(10, (2, 12)))
    assert not torch.allclose(plain.pow(2).mean(-1).sqrt(), torch.ones(2, 12), atol=1e-2)
    with pytest.raises(ValueError, match="mlp must be gelu or swiglu"):
        MinimalRecurrentLM(MinimalSettings(mlp="relu"), vocab_size=10)
