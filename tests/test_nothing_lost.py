"""Nothing is lost when training goes wrong: a non-finite step, a damaged checkpoint, a save
that fails midway, a process of a torchrun job that dies, a training process killed at random."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_RUN, small_config, weights_of
from loopdb.cli import main
from loopdb.errors import ConfigError, RunError, TrainingError
from loopdb.runs import checkpoint as checkpoint_lib
from loopdb.runs.checkpoint import latest_checkpoint, verify_checkpoint
from loopdb.runs.folder import load_model
from loopdb.training.trainer import Trainer


def trainer(data_dir, run, resume=False, **config):
    return Trainer(small_config(**config), data_dir, run, resume=resume, progress=False, log_tensorboard=False)


def run_cli(capsys, *argv):
    code = main([str(part) for part in argv])
    out, err = capsys.readouterr()
    return code, out, err


def poison(trainer, steps: set[int], where: str = "loss"):
    """Make the training steps in ``steps`` (1-based) non-finite: the loss itself, or only the
    gradients (a finite loss whose backward gives NaN: 0 * d sqrt(x)/dx at x = 0)."""
    original = trainer.objective.loss

    def loss(model, batch, generator, step):
        value, stats = original(model, batch, generator, step)
        if step + 1 in steps:
            if where == "loss":
                value = value * float("nan")
            else:
                first = next(p for p in model.parameters() if p.requires_grad)
                value = value + 0.0 * torch.sqrt(first.sum() * 0.0)
        return value, stats

    trainer.objective.loss = loss


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# -- a non-finite step ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_stops_the_run_before_it_changes_the_weights(data_dir, tmp_path, where):
    run = tmp_path / "run"
    bad = trainer(data_dir, run, max_steps=8, checkpoint_every=2, eval_every=100)
    poison(bad, {5}, where)
    with pytest.raises(TrainingError) as caught:
        bad.train()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("step 5: ")
    assert "lr=" in message and "grad_clip=" in message and "bf16" in message and "skip_nonfinite_steps" in message
    assert "step-0000004 stays `latest`" in message
    assert bad.step == 4 and all_finite(weights_of(bad.model))
    assert latest_checkpoint(run).name == "step-0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    # the weights are exactly those of the good checkpoint: the bad step changed nothing
    saved = load_file(latest_checkpoint(run) / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in weights_of(bad.model).items())


def test_skipped_non_finite_steps_change_nothing_and_too_many_in_a_row_stop(data_dir, tmp_path):
    skipping = trainer(data_dir, tmp_path / "skip", max_steps=7, skip_nonfinite_steps=2, checkpoint_every=100)
    poison(skipping, {3, 4, 6})
    for _ in range(2):
        skipping.train_step()
    before = weights_of(skipping.model)
    skipping.train_step()
    skipping.train_step()  # steps 3 and 4: skipped, no update
    assert all(torch.equal(before[k], v) for k, v in weights_of(skipping.model).items())
    assert skipping.skipped_in_a_row == 2 and skipping.step == 4
    skipping.train()  # step 5 is good (resets the count), 6 skipped, 7 good
    assert skipping.step == 7 and skipping.skipped_steps == 3 and skipping.skipped_in_a_row == 0
    assert all_finite(weights_of(skipping.model))
    assert json.loads((tmp_path / "skip" / "train_summary.json").read_text())["skipped_nonfinite_steps"] == 3
    exp_avg = [s["exp_avg"] for s in skipping.optimizer.state.values()]
    assert all(bool(torch.isfinite(e).all()) for e in exp_avg)  # the optimizer never saw a NaN

    stopping = trainer(data_dir, tmp_path / "stop", max_steps=9, skip_nonfinite_steps=2, checkpoint_every=100)
    poison(stopping, {3, 4, 5})
    with pytest.raises(TrainingError, match=r"step 5: .* \(3 non-finite steps in a row\)"):
        stopping.train()
    with pytest.raises(ConfigError, match="skip_nonfinite_steps must be >= 0"):
        small_config(skip_nonfinite_steps=-1)


def test_an_update_that_overflows_is_never_saved(data_dir, tmp_path):
    run = tmp_path / "run"
    overflowing = trainer(data_dir, run, max_steps=4, checkpoint_every=2)
    overflowing.train_step()
    overflowing.train_step()
    overflowing.save()
    overflowing.train_step()
    with torch.no_grad():
        next(overflowing.model.parameters())[0] = float("inf")  # as if an update had overflowed
    with pytest.raises(TrainingError, match="became non-finite .* step-0000002 stays `latest`"):
        overflowing.save()
    assert latest_checkpoint(run).name == "step-0000002" and not (run / "checkpoints" / "step-0000003").exists()
    with pytest.raises(RunError, match="refusing to save"):  # the storage layer refuses on its own too
        checkpoint_lib.save_checkpoint(run, overflowing.model, None, 3, overflowing.config)


def test_cli_diverging_run_is_one_line_and_exit_2(capsys, data_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", data_dir, "--out", run, "--quiet",
                             *SMALL_RUN, "--lr=1e4", "--grad_clip=1e9", "--max_steps=30", "--checkpoint_every=2")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("loopdb train: error: step ") and "lr=10000" in lines[-1]
    assert len(lines) == 2 and lines[0].startswith("model:")  # the model line, then the error
    for folder in (run / "checkpoints").iterdir() if (run / "checkpoints").exists() else []:
        assert all_finite(load_file(folder / "model.safetensors")), folder.name


# -- a damaged checkpoint ------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def finished_run(data_dir, tmp_path):
    """A 6-step run with checkpoints at steps 4 and 6 (KEEP_CHECKPOINTS = 2) and its final weights."""
    run = tmp_path / "run"
    straight = trainer(data_dir, run, max_steps=6, checkpoint_every=2, eval_every=100)
    straight.train()
    return run, weights_of(straight.model)


def test_a_reader_follows_a_training_that_replaces_the_checkpoint_it_was_reading(finished_run, monkeypatch):
    """A training rotates its checkpoints: the one `latest` named can vanish mid-read. The reader
    then loads the one `latest` names now; a checkpoint damaged in place is still refused."""
    from loopdb.runs import folder

    run, final = finished_run
    real_load = folder.load_weights
    calls = []

    def rotated_away(model, checkpoint):  # the first read finds step 6 gone and `latest` moved to step 4
        calls.append(checkpoint.name)
        if len(calls) == 1:
            (run / "latest").write_text("step-0000004")
            raise RunError(f"checkpoint file {checkpoint}/model.safetensors is damaged (FileNotFoundError)")
        return real_load(model, checkpoint)

    monkeypatch.setattr(folder, "load_weights", rotated_away)
    model, _ = load_model(run)
    assert calls == ["step-0000006", "step-0000004"]
    monkeypatch.setattr(folder, "load_weights", lambda model, checkpoint: (_ for _ in ()).throw(
        RunError(f"checkpoint file {checkpoint} is damaged (truncated)")))
    with pytest.raises(RunError, match="damaged"):
        load_model(run)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete trainer.pt", "delete the folder"])
def test_manifest_catches_damage_and_resume_falls_back_bit_identical(finished_run, data_dir, capsys, damage):
    run, final = finished_run
    newest = run / "checkpoints" / "step-0000006"
    assert verify_checkpoint(newest) is True
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.safetensors", "trainer.pt", "config.json"}
    assert manifest["model.safetensors"]["bytes"] == (newest / "model.safetensors").stat().st_size
    if damage == "truncate":
        truncate(newest / "model.safetensors")
    elif damage == "flip a byte":  # same size, other content: only the checksum sees it
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "delete trainer.pt":
        (newest / "trainer.pt").unlink()
    else:
        import shutil
        shutil.rmtree(newest)
    with pytest.raises(RunError, match="step-0000006"):
        verify_checkpoint(newest)
    with pytest.raises(RunError, match=r"damaged|missing") as caught:
        load_model(run)
    assert "--resume" in str(caught.value) and "step-0000004" in str(caught.value)

    resumed = trainer(data_dir, run, resume=True, max_steps=6, checkpoint_every=2, eval_every=100)
    warnings = capsys.readouterr().err
    assert resumed.step == 4 and "step-0000006" in warnings and "resuming from step-0000004" in warnings
    resumed.train()
    assert all(torch.equal(final[k], v) for k, v in weights_of(resumed.model).items())
    assert latest_checkpoint(run).name == "step-0000006" and verify_checkpoint(latest_checkpoint(run))
    assert all(torch.equal(final[k], v) for k, v in load_model(run)[0].state_dict().items())


def test_resume_with_no_intact_checkpoint_says_so(finished_run, data_dir):
    run, _ = finished_run
    for folder in (run / "checkpoints").iterdir():
        truncate(folder / "model.safetensors")
    with pytest.raises(ConfigError, match="none of the 2 checkpoint"):
        trainer(data_dir, run, resume=True, max_steps=6)


def test_a_checkpoint_without_manifest_still_loads_and_is_refused_when_it_does_not_parse(finished_run, data_dir):
    run, final = finished_run
    for folder in (run / "checkpoints").iterdir():
        (folder / "manifest.json").unlink()  # as written before manifests existed
    newest = latest_checkpoint(run)
    assert verify_checkpoint(newest) is False  # unverified, yet usable
    assert all(torch.equal(final[k], v) for k, v in load_model(run)[0].state_dict().items())
    truncate(newest / "model.safetensors")
    with pytest.raises(RunError, match="model.safetensors is damaged"):
        load_model(run)
    resumed = trainer(data_dir, run, resume=True, max_steps=6, checkpoint_every=2, eval_every=100)
    assert resumed.step == 4
    resumed.train()
    assert all(torch.equal(final[k], v) for k, v in weights_of(resumed.model).items())


def test_cli_score_sample_eval_refuse_a_damaged_checkpoint_in_one_line(finished_run, capsys, tmp_path):
    run, _ = finished_run
    truncate(run / "checkpoints" / "step-0000006" / "model.safetensors")
    output = tmp_path / "eval.json"
    for argv in (["score", run, "--loops", "1"], ["sample", run],
                 ["eval", run, "--tasks", "shakespeare_bpb", "--output", output]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert "step-0000006/model.safetensors is damaged" in err and "--resume" in err
    assert not output.exists()


# -- a save that fails midway -------------------------------------------------------------------------------
def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device", "model.safetensors")


@pytest.mark.parametrize("writer", ["save_file", "torch.save", "the latest pointer"])
def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, writer):
    run = tmp_path / "run"
    partial = trainer(data_dir, run, max_steps=4, checkpoint_every=2, eval_every=100)
    for _ in range(2):
        partial.train_step()
    partial.save()
    kept = weights_of(partial.model)
    if writer == "save_file":
        def half_written(tensors, path):  # writes part of the file, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            disk_full()
        monkeypatch.setattr(checkpoint_lib, "save_file", half_written)
    elif writer == "torch.save":
        monkeypatch.setattr(checkpoint_lib.torch, "save", disk_full)
    else:
        monkeypatch.setattr(checkpoint_lib, "_atomic_write_text", disk_full)
    with pytest.raises(RunError) as caught:
        partial.train()
    message = str(caught.value)
    assert "\n" not in message and "could not save checkpoint step-0000004: No space left on device" in message
    assert "step-0000002 is untouched and still `latest`" in message and "--resume" in message
    assert latest_checkpoint(run).name == "step-0000002" and verify_checkpoint(latest_checkpoint(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert all(torch.equal(kept[k], v) for k, v in load_model(run)[0].state_dict().items())
    monkeypatch.undo()
    resumed = trainer(data_dir, run, resume=True, max_steps=4, checkpoint_every=2, eval_every=100)
    assert resumed.step == 2  # `latest` decides, even when a complete step-4 folder made it to disk
    resumed.train()
    assert latest_checkpoint(run).name == "step-0000004" and verify_checkpoint(latest_checkpoint(run))


def test_cli_failed_save_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_lib.torch, "save", disk_full)
    code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", data_dir, "--out", tmp_path / "run",
                             "--quiet", *SMALL_RUN, "--max_steps=2", "--checkpoint_every=1")
    assert code == 2 and err.strip().splitlines()[-1].startswith("loopdb train: error: could not save checkpoint")
    assert "no earlier checkpoint exists" in err and not (tmp_path / "run" / "latest").exists()


# -- processes -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopdb_train(run, data_dir, *extra, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "loopdb", "train", "--preset", "tiny", "--data", str(data_dir),
                             "--out", str(run), "--quiet", *SMALL_RUN, *extra],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


def test_a_rank_that_dies_stops_the_other_with_one_line(data_dir, tmp_path):
    """Two gloo processes, no torchrun (which would kill the survivor itself): SIGKILL rank 1 while
    they train; rank 0 stops within seconds, in one line, instead of waiting forever."""
    port = free_port()
    ranks = [loopdb_train(tmp_path / "run", data_dir, "--max_steps=100000", "--checkpoint_every=100000",
                          "--eval_every=100000", "--device=cpu",
                          env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for rank in (0, 1)]
    try:
        assert ranks[0].stderr.readline().startswith("model:")  # rank 0 joined the job and is training
        time.sleep(1.0)
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = ranks[0].wait(timeout=60)
        waited = time.monotonic() - killed_at
        err = ranks[0].stderr.read()
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("loopdb train: error: rank 0 of 2: ") and "died or hung" in lines[0]
    assert waited < 30, f"rank 0 needed {waited:.1f}s to notice"


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(data_dir, tmp_path):
    """kill -9 a training process at random moments (mid-step, mid-save) and resume until it
    finishes: the final weights equal an uninterrupted run's, bit for bit."""
    steps = ["--max_steps=120", "--checkpoint_every=7", "--eval_every=50"]
    started = time.monotonic()
    assert loopdb_train(tmp_path / "straight", data_dir, *steps, stdout=subprocess.DEVNULL).wait() == 0
    duration = time.monotonic() - started
    rng = random.Random(17)
    kills, run = 0, tmp_path / "killed"
    for attempt in range(30):
        resume = ["--resume"] if latest_checkpoint(run) is not None else []
        process = loopdb_train(run, data_dir, *steps, *resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = process.wait(timeout=rng.uniform(0.3, 0.8) * duration)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert code == 0, f"attempt {attempt} exited {code}"
        break
    else:
        pytest.fail("the killed run never finished")
    assert kills >= 2, "no process was killed: the test proved nothing"
    straight = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    resumed = load_file(latest_checkpoint(run) / "model.safetensors")
    assert latest_checkpoint(run).name == "step-0000120"
    assert metrics_steps(run) == [50, 100, 120]  # one row per evaluated step, however often it was killed
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


# -- one training per run folder; stop signals; what a resume keeps ---------------------------------------------
def wait_for(condition, process, timeout=120.0):
    """Poll ``condition()`` until true; fail if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the training ended early (exit {process.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def sigterm_once(process, ready, settle: float = 0.0):
    """SIGTERM ``process`` ``settle`` seconds after ``ready()``; (stdout, stderr, seconds it took to exit)."""
    try:
        wait_for(ready, process)
        time.sleep(settle)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, err = process.communicate(timeout=120)
        return out, err, time.monotonic() - signalled
    finally:
        process.kill()


def metrics_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_folder_trains_in_one_process_and_kill_9_frees_it_at_once(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    first = loopdb_train(run, data_dir, "--max_steps=100000", "--checkpoint_every=5", "--eval_every=100000",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: latest_checkpoint(run) is not None, first)
        others = [loopdb_train(run, data_dir, "--max_steps=100000", *resume, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
                  for resume in ([], ["--resume"])]  # a second training, and a resume, of the folder being trained
        for second in others:
            out, err = second.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith("loopdb train: error: ") and "is being trained by" in lines[0]
            assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.poll() is None  # the first went on undisturbed
        code, out, err = run_cli(capsys, "score", run, "--loops", "1", "--max-windows", "1", "--samples", "1")
        assert code == 0, err  # readers do not take the lock
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / "train.lock").exists()  # left behind by the killed process, and no obstacle
    resumed_from = int(latest_checkpoint(run).name.removeprefix("step-"))
    code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", data_dir, "--out", run, "--quiet",
                             *SMALL_RUN, f"--max_steps={resumed_from + 1}", "--resume")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["step"] == resumed_from + 1 and f"max_steps 100000 -> {resumed_from + 1}" in err


def test_sigterm_in_the_closing_evaluation_stops_within_seconds_with_a_checkpoint(data_dir, tmp_path, capsys):
    """The closing evaluation (tens of minutes at these settings) is abandoned; the final step is saved,
    and a resume (which may make the evaluation cheaper) runs the evaluation it still owes."""
    run = tmp_path / "run"
    slow_evaluation = ["--eval_loops=1,2,4,8,16,32,64", "--eval_samples=64", "--eval_windows=64"]
    process = loopdb_train(run, data_dir, "--max_steps=3", "--checkpoint_every=2", "--eval_every=100000",
                           *slow_evaluation, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # step 2 saved; step 3 takes milliseconds, then the closing evaluation starts
    out, err, waited = sigterm_once(process, lambda: latest_checkpoint(run) is not None, settle=2.0)
    assert process.returncode == 130 and "evaluation abandoned" in err and "Traceback" not in err, err
    assert waited < 10, f"{waited:.1f}s from SIGTERM to exit"
    assert "stopped; newest checkpoint step-0000003; continue with: loopdb train --preset tiny" in err
    assert latest_checkpoint(run).name == "step-0000003" and verify_checkpoint(latest_checkpoint(run))
    assert not (run / "metrics.jsonl").exists()  # nothing evaluated yet
    code, out, err = run_cli(capsys, "train", "--preset", "tiny", "--data", data_dir, "--out", run, "--quiet",
                             *SMALL_RUN, "--max_steps=3", "--eval_loops=1", "--resume")
    assert code == 0 and "eval_loops 1,2,4,8,16,32,64 -> 1" in err and "eval_samples 64 -> 1" in err, err
    assert metrics_steps(run) == [3] and "val/bpb@1" in json.loads(out.splitlines()[-1])


def test_sigterm_in_data_preparation_stops_within_seconds_and_leaves_nothing(tmp_path):
    """The default corpus, prepared on first use into $LOOPDB_DATA: stopped while it is written, the
    staging folder goes, no run folder is made, and the line says how to start again."""
    data, run = tmp_path / "data", tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "loopdb", "train", "--preset", "tiny", "--out", str(run),
                                "--quiet"], env={**os.environ, "OMP_NUM_THREADS": "1", "LOOPDB_DATA": str(data)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out, err, waited = sigterm_once(process, lambda: data.is_dir() and any(data.iterdir()))  # the staging folder
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"stopped before the first checkpoint; start again with: loopdb train " \
                                           f"--preset tiny --out {run}"
    assert waited < 30, f"{waited:.1f}s from SIGTERM to exit"  # a tokenizer being trained finishes first
    assert list(data.iterdir()) == [] and not run.exists()


def test_a_second_stop_signal_exits_at_once(tmp_path):
    """While a step or a checkpoint finishes, the first signal only asks; a second one ends the process."""
    script = ("import os, signal, time\n"
              "from loopdb.training.trainer import StopSignals\n"
              "with StopSignals(abandon=False) as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.1)\n"
              "    assert stop.asked\n"
              "    print('asked', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM and result.stdout == "asked\n", result
    assert "second SIGTERM: stopped at once" in result.stderr


@pytest.fixture
def cli_run(data_dir, tmp_path, capsys):
    """A 2-step run made by `loopdb train --preset tiny` (so it records its preset), and its argv."""
    argv = ["train", "--preset", "tiny", "--data", data_dir, "--out", tmp_path / "run", "--quiet", *SMALL_RUN]
    code, out, err = run_cli(capsys, *argv, "--max_steps=2")
    assert code == 0, err
    return tmp_path / "run", argv


@pytest.mark.parametrize("change, named", [
    (["--preset", "tiny-draft"], "was trained from --preset tiny, not tiny-draft; resume it with --preset tiny"),
    (["--d_model=64"], "d_model 32 -> 64"),
    (["--seed=1", "--batch_size=8"], "batch_size 4 -> 8, seed 0 -> 1"),
    (["--max_steps=1"], "max_steps=1 is below step 2"),
])
def test_a_resume_that_would_change_the_model_or_data_is_refused_in_one_line(cli_run, capsys, change, named):
    run, argv = cli_run
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    argv = argv[:1] + change + argv[3:] if change[0] == "--preset" else argv + change
    code, out, err = run_cli(capsys, *argv, "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loopdb train: error: --resume: "), err
    assert named in lines[0]
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_metrics_keep_one_row_per_step_after_two_interrupted_resumes(data_dir, tmp_path):
    """Crashes between checkpoints (as kill -9 would: nothing saved) in steps 6 and 9, each after a row
    newer than the checkpoint (rows 4 and 8, checkpoints 3 and 6); each resume drops those rows, and the file ends as an
    uninterrupted run's."""
    settings = dict(max_steps=9, checkpoint_every=3, eval_every=4)
    trainer(data_dir, tmp_path / "straight", **settings).train()
    expected = metrics_steps(tmp_path / "straight")
    assert expected == [4, 8, 9]
    run = tmp_path / "run"
    for crash_at, resume in ((6, False), (9, True)):
        crashing = trainer(data_dir, run, resume=resume, **settings)
        original = crashing.objective.loss

        def loss(model, batch, generator, step, original=original, crash_at=crash_at):
            if step + 1 == crash_at:
                raise RuntimeError("crash")
            return original(model, batch, generator, step)

        crashing.objective.loss = loss
        with pytest.raises(RuntimeError, match="crash"):
            crashing.train()
        assert metrics_steps(run) == [step for step in expected if step < crash_at]
    trainer(data_dir, run, resume=True, **settings).train()
    assert metrics_steps(run) == expected
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
