import json

import pytest
import torch

from conftest import SMALL_RUN, small_config, weights_of as weights
from loopdb.runs.checkpoint import latest_checkpoint
from loopdb.runs.folder import load_model
from loopdb.cli import main
from loopdb.config import ConfigError, preset
from loopdb.training.trainer import Trainer, learning_rate


def test_resume_continues_exactly(data_dir, tmp_path):
    straight = Trainer(small_config(max_steps=6), data_dir, tmp_path / "a", progress=False, log_tensorboard=False)
    straight.train()

    first = Trainer(small_config(max_steps=6), data_dir, tmp_path / "b", progress=False, log_tensorboard=False)
    for _ in range(3):
        first.train_step()
    first.save()  # as if stopped here
    resumed = Trainer(small_config(max_steps=6), data_dir, tmp_path / "b", resume=True, progress=False,
                      log_tensorboard=False)
    assert resumed.step == 3
    resumed.train()
    a, b = weights(straight.model), weights(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_same_seed_same_run_other_seed_other_run(data_dir, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer = Trainer(small_config(max_steps=3, seed=seed), data_dir, tmp_path / name, progress=False,
                          log_tensorboard=False)
        for _ in range(3):
            trainer.train_step()
        runs.append(weights(trainer.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_checkpoint_loads_into_an_identical_model_and_logs(data_dir, tmp_path):
    trainer = Trainer(small_config(max_steps=4, checkpoint_every=2, eval_every=2), data_dir, tmp_path / "run",
                      progress=False)
    trainer.train()
    model, config = load_model(tmp_path / "run")
    assert config.model.d_model == 32
    trained = weights(trainer.model)
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert {"val/bpb@1", "val/bpb@2", "train/loss"} <= rows[-1].keys()
    assert list((tmp_path / "run" / "tb").iterdir())  # tensorboard events
    # a half-written checkpoint folder is never what `latest` points to
    staging = tmp_path / "run" / "checkpoints" / "step-0000006.tmp"
    staging.mkdir()
    assert latest_checkpoint(tmp_path / "run").name == "step-0000004"


def test_existing_run_needs_resume(data_dir, tmp_path):
    Trainer(small_config(max_steps=1), data_dir, tmp_path / "run", progress=False, log_tensorboard=False).train()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(small_config(max_steps=1), data_dir, tmp_path / "run", progress=False, log_tensorboard=False)


def test_learning_rate_schedule():
    config = small_config(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(0.1)
    assert learning_rate(55, config) == pytest.approx(0.55)


def test_overrides_are_checked():
    with pytest.raises(ConfigError, match="unknown config key 'd_modle'"):
        preset("tiny").apply_overrides({"d_modle": "3"})
    with pytest.raises(ConfigError, match="expected int"):
        preset("tiny").apply_overrides({"d_model": "big"})
    with pytest.raises(ConfigError, match="divisible"):
        preset("tiny").apply_overrides({"d_model": "30"})
    config = preset("tiny").apply_overrides({"model.d_model": "64", "bf16": "true", "eval_loops": "1,3"})
    assert config.model.d_model == 64 and config.train.bf16 and config.train.eval_loops == (1, 3)


# -- command line --------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main([str(part) for part in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "huge", "--out", "X"], "unknown preset 'huge'"),
        (["train", "--preset", "tiny", "--out", "X", "--d_modle=3"], "unknown config key"),
        (["train", "--preset", "tiny", "--out", "X", "stray"], "--key=value"),
        (["score", "MISSING", "--loops", "1,4"], "does not exist"),
        (["sample", "MISSING"], "does not exist"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(capsys, tmp_path, argv, message):
    argv = [str(tmp_path / a) if a in ("X", "MISSING") else a for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_train_score_sample(capsys, data_dir, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--preset", "tiny", "--data", data_dir, "--out", run, "--quiet",
                           *SMALL_RUN, "--max_steps=2")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 2

    code, out, _ = run_cli(capsys, "score", run, "--split", "test", "--loops", "1,3", "--samples", "2",
                           "--max-windows", "3", "--json")
    report = json.loads(out)
    assert code == 0 and set(report["bpb"]) == {"1", "3"} and report["samples"] == 2
    assert all(0 < value < 20 for value in report["bpb"].values()) and report["unigram_bpb"] > 0

    for bad in ("0", "1,-2", "x"):
        code, _, err = run_cli(capsys, "score", run, "--loops", bad)
        assert code == 2 and "--loops" in err
    code, _, err = run_cli(capsys, "sample", run, "--loops", "0")
    assert code == 2 and "--loops" in err

    code, out, _ = run_cli(capsys, "sample", run, "--loops", "2", "--prompt", "KING:", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("KING:")

    # sampler settings may change at inference; the grid's last sigma moves K=2's number, not K=1's
    def score(*extra):
        code, out, _ = run_cli(capsys, "score", run, "--loops", "1,2", "--samples", "1", "--max-windows", "3",
                               "--json", *extra)
        assert code == 0
        return json.loads(out)["bpb"]

    plain, stopped = score(), score("--grid_sigma_last=0.3")
    assert plain["1"] == stopped["1"] and plain["2"] != stopped["2"]
    code, _, err = run_cli(capsys, "score", run, "--d_model=64")
    assert code == 2 and "cannot change after training" in err


@pytest.mark.parametrize("clock", ["wall", "cpu"])
@pytest.mark.parametrize("fast", ["wall", "cpu"])
def test_a_time_budget_counts_on_its_clock(data_dir, tmp_path, monkeypatch, clock, fast):
    """A 0.6 s budget: the clock that runs fast (a second per read) ends the run after its first step
    when it is the budget's clock; the slow one (a microsecond per read) never does (max_steps does)."""
    from loopdb.training import trainer as trainer_module

    ticks = {"wall": 0.0, "cpu": 0.0}

    def reader(name):
        def read():
            ticks[name] += 1.0 if name == fast else 1e-6
            return ticks[name]
        return read

    monkeypatch.setattr(trainer_module.time, "perf_counter", reader("wall"))
    monkeypatch.setattr(trainer_module.time, "process_time", reader("cpu"))
    config = small_config(max_steps=8, eval_every=1000, checkpoint_every=1000, time_budget_minutes=0.01,
                          time_budget_clock=clock)
    trainer = Trainer(config, data_dir, tmp_path / "run", progress=False, log_tensorboard=False)
    trainer.train()
    assert trainer.step == (1 if clock == fast else 8)
