"""Bad inputs, table-driven: each gets one line on stderr, exit code 2, no traceback, and
nothing written (CLI flags, config JSON, corpora, lm-eval requests). More single cases live
in test_trainer.py (unknown preset or key), test_data.py (corpus errors of `prepare` as a
library) and test_harness.py (`loopdb eval` errors)."""

import json
import random
import shutil

import pytest
import torch

from conftest import SMALL_RUN, small_config
from loopdb.cli import main
from loopdb.training.trainer import Trainer


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("bad_inputs") / "run"
    Trainer(small_config(max_steps=2), data_dir, run, progress=False, log_tensorboard=False).train()
    return run


@pytest.fixture(scope="module")
def inputs(small_run, tmp_path_factory):
    """The bad files the table refers to, by name."""
    folder = tmp_path_factory.mktemp("inputs")
    files = {"binary": folder / "binary.bin", "empty": folder / "empty.txt", "one_line": folder / "one_line.txt",
             "not_json": folder / "not_json.json", "unknown_key": folder / "unknown_key.json",
             "not_an_object": folder / "list.json", "empty_dir": folder / "empty_dir"}
    files["binary"].write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    files["empty"].write_text("")
    words = ["king", "queen", "of", "the", "and", "crown", "sword"]
    files["one_line"].write_text(" ".join(random.Random(1).choice(words) for _ in range(300_000)))  # ~1.5 MB
    files["not_json"].write_text('{"plain": {"lr": 0.001')
    files["unknown_key"].write_text(json.dumps({"plain": {"d_modle": 64}}))
    files["not_an_object"].write_text("[1, 2]")
    files["empty_dir"].mkdir()
    # runs whose saved config.json is broken (written by hand or by a newer loopdb), no manifest to catch it
    for name, text in (("run_config_not_json", "{"), ("run_config_unknown_key", json.dumps({"model": {"wings": 2}}))):
        copy = folder / name
        shutil.copytree(small_run, copy)
        checkpoint = copy / "checkpoints" / (copy / "latest").read_text().strip()
        (checkpoint / "manifest.json").unlink()
        (checkpoint / "config.json").write_text(text)
        files[name] = copy
    return files


TRAIN = ["train", "--preset", "tiny", "--data", "DATA", "--out", "OUT", "--quiet"]
CASES = [
    # command-line flags
    (TRAIN + ["--max_steps=0"], "max_steps must be >= 1"),
    (TRAIN + ["--lr=fast"], "--lr=fast: expected float"),
    (TRAIN + ["--skip_nonfinite_steps=-1"], "skip_nonfinite_steps must be >= 0"),
    (TRAIN + ["--collective_timeout_minutes=0"], "collective_timeout_minutes must be > 0"),
    (TRAIN + ["--resume"], "has no checkpoint to resume from"),
    (["train", "--preset", "tiny", "--data", "empty_dir", "--out", "OUT"], "is not a prepared dataset"),
    (["score", "RUN", "--samples", "0"], "--samples 0: must be >= 1"),
    (["score", "RUN", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["score", "RUN", "--max-windows", "0"], "--max-windows 0: must be >= 1"),
    (["sample", "RUN", "--top-k", "-5"], "--top-k -5: must be >= 0"),
    (["sample", "RUN", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["sample", "RUN", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["eval", "RUN", "--tasks", " , ", "--output", "OUT/eval.json"], "--tasks: name at least one task"),
    (["compare", "--steps", "0", "--out", "OUT"], "--steps >= 1"),
    (["study", "--variants", "unknown_key", "--budget-minutes", "0", "--out", "OUT"], "--budget-minutes must be > 0"),
    # config JSON: a study's variants file, a run's saved config
    (["study", "--variants", "not_json", "--steps", "1", "--out", "OUT"], "is not valid JSON"),
    (["study", "--variants", "unknown_key", "--steps", "1", "--out", "OUT"], "unknown config key 'd_modle'"),
    (["study", "--variants", "not_an_object", "--steps", "1", "--out", "OUT"], "must be a JSON object"),
    (["score", "run_config_not_json"], "config.json is damaged"),
    (["sample", "run_config_unknown_key"], "unknown config key 'wings'"),
    # corpora
    (["prepare", "--out", "OUT", "--corpus", "binary", "--vocab-size", "300"], "is not valid UTF-8"),
    (["prepare", "--out", "OUT", "--corpus", "empty", "--vocab-size", "300"], "only empty or whitespace files"),
    (["prepare", "--out", "OUT", "--corpus", "one_line", "--vocab-size", "300"], "too few to hold out"),
]


def listing(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, data_dir, small_run, inputs, tmp_path,
                                                        capsys):
    names = {"DATA": data_dir, "RUN": small_run, "OUT": tmp_path / "out", **inputs}
    argv = [str(names.get(part, part)).replace("OUT", str(tmp_path / "out")) for part in argv]
    folders = (tmp_path, small_run, inputs["empty"].parent)
    before = [listing(folder) for folder in folders]
    code = main(argv)  # a traceback would be an exception escaping here
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    errors = [line for line in err.strip().splitlines() if not line.startswith("[loopdb prepare]")]  # progress
    assert len(errors) == 1 and errors[0].startswith(f"loopdb {argv[0]}: error: "), err
    assert message in errors[0] and "Traceback" not in err
    assert [listing(folder) for folder in folders] == before, "a bad input wrote something"


# -- lm-eval requests -------------------------------------------------------------------------------------
def test_lm_eval_unknown_model_args_are_one_clear_error(small_run):
    from loopdb.errors import EvalError
    from loopdb.evaluation.lm_eval_model import LoopDBLM

    with pytest.raises(EvalError, match=r"unknown loopdb model arg\(s\) loops, temp; known: run, num_loops"):
        LoopDBLM.create_from_arg_string(f"run={small_run},loops=4,temp=1")
    with pytest.raises(EvalError, match="num_loops"):
        LoopDBLM.create_from_arg_string(f"run={small_run},num_loops=zero")


def test_lm_eval_edge_requests_are_answered(small_run):
    """An empty context and a continuation longer than the window are legal requests: answered,
    finite, with the continuation scored in several windows (each token once)."""
    from loopdb.evaluation.lm_eval_model import LoopDBLM

    lm = LoopDBLM(run=small_run, num_loops=2, samples=1)
    window = lm.max_length
    long_continuation = [(7 * i) % 300 + 5 for i in range(3 * window + 1)]
    (empty, _), (long, _), (nothing, greedy) = lm._loglikelihood_tokens(
        [(None, [], [11, 12]), (None, [3, 4], long_continuation), (None, [3, 4], [])])
    assert torch.isfinite(torch.tensor([empty, long])).all() and empty < 0 and long < empty
    units = lm.windows_for([3, 4], long_continuation)
    assert len(units) == 4 and sum(count for _, count in units) == len(long_continuation)
    assert all(len(tokens) <= window + 1 for tokens, _ in units)
    assert (nothing, greedy) == (0.0, True)  # an empty continuation: log p of nothing
