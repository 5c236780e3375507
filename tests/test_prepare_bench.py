"""`loopdb bench prepare` (docs/results/prepare.md): a generated corpus prepared in its own process, with
throughput and peak memory. The 1 GB run is slow-marked (`pytest -m slow`)."""

import json

import pytest

from loopdb.cli import main
from loopdb.evaluation import prepare_bench


def test_generated_corpus_is_seeded_word_lines(tmp_path):
    written = prepare_bench.generate_corpus(tmp_path / "a", 0.5, seed=3)
    prepare_bench.generate_corpus(tmp_path / "b", 0.5, seed=3)
    prepare_bench.generate_corpus(tmp_path / "c", 0.5, seed=4)
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) == prepare_bench.DOCUMENTS and abs(written - 500_000) <= 2 * prepare_bench.DOCUMENTS
    for path in files:
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
        assert path.read_bytes() != (tmp_path / "c" / path.name).read_bytes()
    lines = files[0].read_text(encoding="ascii").split("\n")
    assert lines[-1] == "" and all(len(line.split(" ")) == prepare_bench.WORDS_PER_LINE for line in lines[:-2])


def test_bench_prepare_reports_throughput_and_peaks(tmp_path, capsys):
    assert main(["bench", "prepare", str(tmp_path), "--size-mb", "2", "--workers", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 1.9 < report["corpus_mb"] < 2.1 and report["workers"] == 2 and report["mb_per_s"] > 0
    assert 0 < report["worker_peak_mb"] and 0 < report["main_peak_mb"] < report["peak_bound_mb"]
    assert set(report["phases_s"]) == {"check", "tokenizer", "encode"}
    assert (tmp_path / "prepared" / "meta.json").is_file()  # a given folder is kept


@pytest.mark.slow
def test_a_1gb_corpus_prepares_in_under_2gb(tmp_path):
    report = prepare_bench.run_prepare_bench(1000, folder=tmp_path)
    print(prepare_bench.format_report(report))
    print(json.dumps(report))
    assert report["corpus_mb"] > 999 and report["shards"]["train"] > 1
    assert report["peak_bound_mb"] < 2048
