"""Several processes on torch's own engines (2 gloo processes on CPU): DistributedDataParallel
equals one process drawing the same micro-batches, and multi-process runs (data-parallel,
block-parallel, FSDP2) resume exactly from their torch.distributed.checkpoint shards."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_RUN, torchrun
from loopdb.cli.args import parse_overrides
from loopdb.config import preset
from loopdb.families import check_config, family_of
from loopdb.runs.checkpoint import DISTRIBUTED, WEIGHTS, checkpoint_name, load_trainer_state
from loopdb.training.trainer import Trainer, step_generator

STEPS = 4


def run_flags(**extra):
    """tiny-stacked at d_model 32, context 16: a step samples one of the two blocks per micro-batch,
    so on some steps a block has a gradient on one rank only. Evaluation and checkpoints at step 2
    (between two training steps, where a rank evaluating alone must leave DDP's state alone)."""
    keys = {"n_layers": 4, "num_blocks": 2, "max_steps": STEPS, "eval_every": 2, "checkpoint_every": 2, **extra}
    return [*SMALL_RUN, *[f"--{k}={v}" for k, v in keys.items()]]


def train_two_processes(data_dir, run, *flags, resume=False, preset_name="tiny-stacked"):
    torchrun("train", "--preset", preset_name, "--data", data_dir, "--out", run, "--quiet", *flags,
             *(["--resume"] if resume else []))


def weights_at(run, step) -> dict:
    return load_file(run / "checkpoints" / checkpoint_name(step) / WEIGHTS)


def back_to(run, step) -> None:
    """The run as if it had stopped after checkpoint ``step``: the later checkpoints are gone."""
    for later in (run / "checkpoints").iterdir():
        if later.name > checkpoint_name(step):
            shutil.rmtree(later)
    (run / "latest").write_text(checkpoint_name(step))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    """A 2-process data-parallel run, 2 micro-batches per rank per step, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    train_two_processes(data_dir, run, *run_flags(grad_accum=2))
    return run


def one_process(data_dir, run, grad_accum, resume=False):
    config = preset("tiny-stacked").apply_overrides(parse_overrides(run_flags(grad_accum=grad_accum)))
    return Trainer(config, data_dir, run, resume=resume, progress=False, log_tensorboard=False)


def test_ddp_on_two_processes_equals_one_process_drawing_both_ranks_micro_batches(ddp_run, data_dir, tmp_path):
    """Rank r's micro-step m draws micro-batch 2m + r, so one process with 4 micro-steps per step
    draws what the two ranks draw together (the doubled batch)."""
    single = one_process(data_dir, tmp_path / "single", grad_accum=4)
    chosen = []  # the block each micro-batch trains, in draw order
    choose = single.objective.choose_block
    single.objective.choose_block = lambda model, generator: chosen.append(choose(model, generator)) or chosen[-1]
    for _ in range(STEPS):
        single.train_step()
    by_rank = [[set(chosen[step * 4 + rank::2][:2]) for rank in (0, 1)] for step in range(STEPS)]
    # the case DDP must get right: a block with a gradient on one rank only, averaged as zero on the other
    assert any(rank0 != rank1 for rank0, rank1 in by_rank), by_rank
    assert_same(weights_at(ddp_run, STEPS), single.model.state_dict(), atol=1e-6)


def test_a_two_process_run_resumes_from_its_shards_identically(ddp_run, data_dir, tmp_path):
    checkpoint = ddp_run / "checkpoints" / checkpoint_name(2)
    assert (checkpoint / DISTRIBUTED / ".metadata").is_file()
    assert load_trainer_state(checkpoint)["optimizer"] is None  # the optimizer state lives in the shards
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_run, resumed)
    back_to(resumed, 2)
    train_two_processes(data_dir, resumed, *run_flags(grad_accum=2), resume=True)
    assert_same(weights_at(resumed, STEPS), weights_at(ddp_run, STEPS))


def test_a_two_process_checkpoint_resumes_in_one_process(ddp_run, data_dir, tmp_path):
    """torch.distributed.checkpoint loads without a process group too: the weights come back bit for
    bit, the AdamW state as one process trained to the same step holds it (to float rounding,
    relative to each tensor's scale: the two runs sum the micro-batches' gradients in different orders)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_run, resumed)
    back_to(resumed, 2)
    trainer = one_process(data_dir, resumed, grad_accum=4, resume=True)
    assert trainer.step == 2
    assert_same(weights_at(ddp_run, 2), trainer.model.state_dict())
    fresh = one_process(data_dir, tmp_path / "fresh", grad_accum=4)
    for _ in range(2):
        fresh.train_step()
    expected, loaded = fresh.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert expected.keys() == loaded.keys()
    for index, state in expected.items():
        assert state["step"] == loaded[index]["step"] == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key] - loaded[index][key]).abs().max() <= 1e-5 * state[key].abs().max(), (index, key)


def test_a_damaged_shard_is_caught_and_resume_falls_back(ddp_run, data_dir, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_run, resumed)
    shard = next(p for p in (resumed / "checkpoints" / checkpoint_name(STEPS) / DISTRIBUTED).iterdir()
                 if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-7])  # a truncated copy
    trainer = one_process(data_dir, resumed, grad_accum=4, resume=True)
    assert "is damaged" in capsys.readouterr().err
    assert trainer.step == 2
    assert_same(weights_at(ddp_run, 2), trainer.model.state_dict())


def test_block_parallel_stop_and_resume_gives_identical_weights(data_dir, tmp_path):
    """Each rank's own block (weights and AdamW state) and the shared parameters' state come back
    from the shards; the resumed run ends where the uninterrupted one did, bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_two_processes(data_dir, whole, "--block-parallel", *run_flags())
    shutil.copytree(whole, resumed)
    back_to(resumed, 2)
    train_two_processes(data_dir, resumed, "--block-parallel", *run_flags(), resume=True)
    final, before = weights_at(whole, STEPS), weights_at(whole, 2)
    assert not torch.equal(final["blocks.1.denoiser_out.weight"], before["blocks.1.denoiser_out.weight"])
    assert not torch.equal(final["embedding.weight"], before["embedding.weight"])  # the shared parameters train
    assert_same(weights_at(resumed, STEPS), final)


@pytest.mark.slow  # two launches of 2 processes: about 35 s on the shared cores
def test_fsdp_on_two_processes_equals_one_process_and_resumes_identically(data_dir, tmp_path):
    """FSDP2 (each transformer block and the rest sharded over the 2 ranks), objective dense."""
    flags = run_flags(objective="dense", data_parallel="fsdp")
    sharded, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    train_two_processes(data_dir, sharded, *flags)
    config = preset("tiny-stacked").apply_overrides({**parse_overrides(flags), "data_parallel": "ddp", "grad_accum": "2"})
    single = Trainer(config, data_dir, tmp_path / "single", progress=False, log_tensorboard=False)
    for _ in range(STEPS):
        single.train_step()
    assert_same(weights_at(sharded, STEPS), single.model.state_dict(), atol=1e-6)
    shutil.copytree(sharded, resumed)
    back_to(resumed, 2)
    train_two_processes(data_dir, resumed, *flags, resume=True)
    assert_same(weights_at(resumed, STEPS), weights_at(sharded, STEPS))


def test_fsdp_needs_the_dense_objective():
    from loopdb.errors import ConfigError

    with pytest.raises(ConfigError, match="data_parallel=fsdp needs objective=dense"):
        preset("tiny-stacked").apply_overrides({"data_parallel": "fsdp"}).validate()


@pytest.mark.parametrize("name,objective", [("tiny", "diffusion"), ("tiny", "bptt"), ("tiny", "ouro"),
                                            ("tiny-draft", "diffusion"), ("tiny-mdm", "dense"), ("tiny-dit", "dense")])
def test_a_family_that_says_it_trains_every_parameter_does(name, objective, data_dir):
    """DDP skips its search for unused parameters on the family's word; a parameter without a
    gradient would then stop the run, so the word is checked here over several steps."""
    config = preset(name).apply_overrides(parse_overrides([*SMALL_RUN, f"--objective={objective}"]))
    family = family_of(config)
    feed = family.feed(config, None if family.commands == "images" else data_dir)
    config = check_config(config)
    assert family.trains_every_parameter(config)
    torch.manual_seed(0)
    model = family.build(config)
    for step in range(4):
        generator = step_generator(0, step)
        loss, _ = family.objective(config).loss(model, feed.batch(generator, torch.device("cpu")), generator, step)
        loss.backward()
        idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not idle, idle
        model.zero_grad(set_to_none=True)
