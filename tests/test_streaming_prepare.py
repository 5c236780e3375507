"""Streaming `loopdb prepare` (docs/results/prepare.md): chunks, shards and worker processes change the files,
never a token; the tokenizer trains on a bounded sample spread over the train split; ids
above 65,535 pieces are stored as uint32; readers see a split's shards as one array (a
window may span shards); format-1 folders (one uint16 file per split) still load."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import small_config
from loopdb.data import preparation
from loopdb.data.corpus import scan_corpus, split_documents
from loopdb.data.preparation import prepare
from loopdb.data.storage import SPLITS, load_meta, load_tokenizer, load_tokens, task_data_dir
from loopdb.data.windows import eval_windows, sample_windows
from loopdb.cli import main
from loopdb.errors import DataError
from loopdb.families.text import TextFeed
from loopdb.shards import ShardedTokens
from test_data import VOCAB, _document

STREAMED = {"workers": 2, "chunk_mb": 0.02, "shard_mb": 0.01}  # many chunks, shards of 5,000 uint16 ids
WHOLE = {"workers": 1, "chunk_mb": 100, "shard_mb": 100}  # one chunk per document, one shard per split


def _write_corpus(folder):
    """About 0.8 MB in 14 documents; one lacks its final newline, one has CRLF and non-ASCII lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(_document(i, paragraphs=350), encoding="utf-8")
    (folder / "no_newline.txt").write_text(_document(50, paragraphs=30).rstrip("\n"), encoding="utf-8")
    (folder / "crlf.txt").write_bytes(_document(51, paragraphs=30).replace("\n", "\r\n").encode() +
                                      "Ça va? 日本 ★\r\n".encode() * 50)
    return folder


def _document_text(corpus, name) -> str:
    text = (corpus / name).read_bytes().decode("utf-8")
    return text if text.endswith("\n") else text + "\n"  # prepare supplies a missing final newline


def _split_text(corpus, meta, split) -> str:
    return "".join(_document_text(corpus, name) for name in meta["splits"][split]["documents"])


def _token_bytes(folder, split) -> bytes:
    meta = load_meta(folder)
    return b"".join((folder / shard["file"]).read_bytes() for shard in meta["splits"][split]["shards"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    corpus = _write_corpus(root / "corpus")
    whole = prepare(root / "whole", corpus=[corpus], vocab_size=VOCAB, show_progress=False, **WHOLE)
    streamed = prepare(root / "streamed", corpus=[corpus], vocab_size=VOCAB, show_progress=False, **STREAMED)
    return corpus, root, whole, streamed


def test_chunks_shards_and_workers_change_no_token(prepared, tmp_path, capfd):
    corpus, root, whole, streamed = prepared
    again = prepare(tmp_path / "again", corpus=[corpus], vocab_size=VOCAB, show_progress=True, **STREAMED)
    err = capfd.readouterr().err
    chunks = int(re.search(r"encoding (\d+) chunks with 2 worker", err).group(1))
    total = sum(streamed["splits"][s]["bytes"] for s in SPLITS)
    assert total > 800_000 and chunks >= total / 20_100  # a chunk: at most 20 kB, or one cut plus a line
    assert re.search(r"encode: 100%.*B/s", err)  # the progress bar reports throughput
    for split in SPLITS:
        shards = streamed["splits"][split]["shards"]
        assert len(whole["splits"][split]["shards"]) == 1
        assert all(shard["tokens"] == 5000 for shard in shards[:-1]) and 0 < shards[-1]["tokens"] <= 5000
        assert _token_bytes(root / "streamed", split) == _token_bytes(root / "whole", split)
    assert len(streamed["splits"]["train"]["shards"]) > 20
    assert (root / "streamed" / "tokenizer.model").read_bytes() == (root / "whole" / "tokenizer.model").read_bytes()

    def without_shards(meta):
        return {**meta, "splits": {s: {k: v for k, v in meta["splits"][s].items() if k != "shards"}
                                   for s in SPLITS}}

    assert without_shards(streamed) == without_shards(whole)
    # same corpus, same settings: the same files, byte for byte
    assert again == streamed
    names = sorted(p.name for p in (root / "streamed").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (root / "streamed" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_shards_decode_to_the_split_text(prepared):
    corpus, root, _, streamed = prepared
    tokenizer = load_tokenizer(root / "streamed")
    for split in SPLITS:
        tokens = load_tokens(root / "streamed", split)
        text = _split_text(corpus, streamed, split)
        assert tokenizer.decode(tokens) == text
        assert int(tokenizer.token_bytes[np.asarray(tokens)].sum()) == streamed["splits"][split]["bytes"] \
            == len(text.encode("utf-8"))
    every = sorted(n for s in SPLITS for n in streamed["splits"][s]["documents"])
    assert every == sorted(p.name for p in corpus.iterdir())


def test_a_worker_encodes_its_chunk_in_line_batches_to_the_same_ids(prepared, monkeypatch):
    corpus, root, _, _ = prepared
    model, path = (root / "whole" / "tokenizer.model").read_bytes(), corpus / "crlf.txt"
    task = ((str(path), 0, path.stat().st_size, False),)
    whole = preparation._ChunkEncoder("bpe", model, "uint16")(task)
    assert whole.tolist() == load_tokenizer(root / "whole").encode(path.read_bytes().decode("utf-8"))
    monkeypatch.setattr(preparation, "ENCODE_BATCH_CHARS", 500)  # ~50 batches instead of one
    assert np.array_equal(preparation._ChunkEncoder("bpe", model, "uint16")(task), whole)


def test_readers_see_the_shards_as_one_split(prepared):
    _, root, _, _ = prepared
    sharded, single = load_tokens(root / "streamed", "train"), load_tokens(root / "whole", "train")
    assert isinstance(sharded, ShardedTokens) and isinstance(single, np.memmap)
    assert len(sharded) == len(single) and sharded.dtype == single.dtype == np.uint16
    assert np.array_equal(np.asarray(sharded), single)
    for start, stop in [(4990, 5010), (0, 12000), (14999, 15001), (len(single) - 7, len(single) + 5)]:
        assert np.array_equal(sharded[start:stop], single[start:stop])  # across shard boundaries
    index = np.array([[0, 4999, 5000], [len(single) - 1, 12345, 7]])
    assert np.array_equal(sharded[index], single[index])
    seeded = [sample_windows(tokens, 256, 257, torch.Generator().manual_seed(11)) for tokens in (sharded, single)]
    assert torch.equal(*seeded)
    assert [w.tolist() for w in eval_windows(sharded, 300)] == [w.tolist() for w in eval_windows(single, 300)]
    # the trainer's batches: the same windows from either folder
    tasks = [TextFeed(small_config(), root / name) for name in ("streamed", "whole")]
    batches = [task.batch(torch.Generator().manual_seed(3), "cpu") for task in tasks]
    assert torch.equal(*batches)
    # the seeded windows above: some of them ran across a shard boundary
    starts = torch.randint(0, len(single) - 256, (256,), generator=torch.Generator().manual_seed(11))
    assert any(s // 5000 != (s + 256) // 5000 for s in starts.tolist())


def test_sharded_tokens_index_like_an_array():
    parts = [np.arange(0, 4, dtype=np.uint16), np.arange(4, 5, dtype=np.uint16), np.arange(5, 11, dtype=np.uint16)]
    tokens, flat = ShardedTokens(parts), np.arange(11, dtype=np.uint16)
    assert len(tokens) == 11 and tokens.shape == (11,)
    for key in [0, 3, 4, 5, 10, -1, -11]:
        assert tokens[key] == flat[key]
    for key in [slice(None), slice(2, 9), slice(3, 3), slice(9, 2), slice(-3, None), slice(1, 10, 3),
                slice(None, None, -1)]:
        assert np.array_equal(tokens[key], flat[key]), key
    assert np.array_equal(tokens[[10, 0, -1, 4]], flat[[10, 0, -1, 4]])
    assert tokens.tolist() == flat.tolist() and int(np.max(tokens)) == 10
    for bad in (11, -12, [0, 11]):
        with pytest.raises(IndexError):
            tokens[bad]


def test_tokenizer_trains_on_a_bounded_sample_spread_over_the_split(prepared, tmp_path):
    corpus, root, whole, _ = prepared
    cap_mb = 0.1
    meta = prepare(tmp_path / "sampled", corpus=[corpus], vocab_size=VOCAB, show_progress=False,
                   tokenizer_sample_mb=cap_mb, **STREAMED)
    sample = meta["tokenizer_sample"]
    assert not sample["whole_train_split"] and sample["cap_mb"] == cap_mb and sample["pieces"] == 6
    assert 0.8 * cap_mb * 1e6 < sample["bytes"] <= cap_mb * 1e6 < whole["splits"]["train"]["bytes"]
    for split in SPLITS:  # the same split, another tokenizer
        assert [meta["splits"][split][key] for key in ("documents", "bytes")] == \
            [whole["splits"][split][key] for key in ("documents", "bytes")]
    # the sampled lines are whole lines of the train split, from its first to its last documents
    _, docs = scan_corpus([corpus], lambda message: None, None)
    train = split_documents(docs, default_corpus=False)["train"]
    lines, record = preparation._tokenizer_sample(train, int(cap_mb * 1e6))
    where = {}
    for index, piece in enumerate(train):
        for line in _document_text(corpus, piece.name).split("\n"):
            where.setdefault(line, set()).add(index)
    documents = set()
    for line in lines:
        assert line in where, line
        documents |= where[line]
    assert record["bytes"] == sample["bytes"]
    ends = preparation._piece_offsets(train)[1:]
    assert 0 in documents and len(documents) >= 6
    assert max(ends[d] for d in documents) > 0.8 * ends[-1]  # evenly spaced, not the head of the split


def _many_characters(folder, count):
    """Three documents over `count` distinct CJK characters, 50 a line."""
    chars = [chr(c) for c in range(0x4E00, 0xA000)] + [chr(c) for c in range(0x20000, 0x20000 + count - 20992)]
    text = "\n".join("".join(chars[i:i + 50]) for i in range(0, count, 50)) + "\n"
    folder.mkdir()
    for i in range(3):
        (folder / f"d{i}.txt").write_text(text, encoding="utf-8")
    return folder, text


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", None), ("bpe", 67_300)])
def test_vocabularies_above_65535_are_stored_as_uint32(tmp_path, tokenizer, vocab_size):
    corpus, text = _many_characters(tmp_path / "corpus", 67_000)
    kwargs = {"vocab_size": vocab_size} if vocab_size else {}
    meta = prepare(tmp_path / "out", corpus=[corpus], tokenizer=tokenizer, show_progress=False,
                   shard_mb=0.1, chunk_mb=0.05, **kwargs)
    assert meta["vocab_size"] == (67_001 if tokenizer == "char" else 67_300) and meta["dtype"] == "uint32"  # + "\n"
    tok = load_tokenizer(tmp_path / "out")
    for split in SPLITS:
        tokens = load_tokens(tmp_path / "out", split)
        assert tokens.dtype == np.uint32 and len(meta["splits"][split]["shards"]) > 1
        assert sum((tmp_path / "out" / s["file"]).stat().st_size for s in meta["splits"][split]["shards"]) \
            == 4 * len(tokens)
        assert int(np.max(tokens)) > 65535 and tok.decode(tokens) == text


def test_small_vocabularies_stay_uint16(prepared):
    _, root, whole, _ = prepared
    assert whole["dtype"] == "uint16"
    assert (root / "whole" / "train-00000.bin").stat().st_size == 2 * whole["splits"]["train"]["tokens"]


def _as_format_1(source, target):
    """The folder `source` as loopdb wrote it before shards: one uint16 {split}.bin per split."""
    target.mkdir()
    meta = json.loads((source / "meta.json").read_text())
    (target / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
    for split in SPLITS:
        (target / f"{split}.bin").write_bytes(_token_bytes(source, split))
        del meta["splits"][split]["shards"]
    meta.pop("tokenizer_sample")
    meta["format"] = 1
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_format_1_folders_still_load(prepared, tmp_path):
    _, root, _, _ = prepared
    old = _as_format_1(root / "streamed", tmp_path / "old")
    for split in SPLITS:
        tokens = load_tokens(old, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert np.array_equal(tokens, np.asarray(load_tokens(root / "streamed", split)))
    batches = [TextFeed(small_config(), folder).batch(torch.Generator().manual_seed(1), "cpu")
               for folder in (old, root / "whole")]
    assert torch.equal(*batches)
    # re-preparing into an old folder replaces it (its files count as a prepared dataset)
    prepare(old, corpus=[root / "corpus"], vocab_size=VOCAB, show_progress=False, **WHOLE)
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in (root / "whole").iterdir())


def test_damaged_folders_are_one_line_errors(prepared, tmp_path):
    _, root, _, _ = prepared
    old = _as_format_1(root / "whole", tmp_path / "old")
    with open(old / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"val\.bin has 10 bytes but meta.json says \d+ uint16 tokens; rerun"):
        load_tokens(old, "val")
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 7}))
    with pytest.raises(DataError, match="is not dataset format 1 or 2; rerun"):
        load_tokens(old, "val")
    missing = tmp_path / "missing"
    missing.mkdir()
    for path in (root / "streamed").iterdir():
        if path.name != "train-00003.bin":
            (missing / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match=r"train-00003\.bin is missing; rerun"):
        load_tokens(missing, "train")


@pytest.mark.parametrize("settings, message", [
    ({"workers": 0}, "--workers must be a positive integer, got 0"),
    ({"workers": 1.5}, "--workers must be a positive integer"),
    ({"shard_mb": 0}, "--shard-mb must be a positive number of MB"),
    ({"chunk_mb": -1.0}, "--chunk-mb must be a positive number of MB"),
    ({"tokenizer_sample_mb": float("nan")}, "--tokenizer-sample-mb must be a positive number of MB"),
])
def test_bad_streaming_settings_are_clear_errors(prepared, tmp_path, settings, message):
    corpus = prepared[0]
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(tmp_path / "out", corpus=[corpus], vocab_size=VOCAB, show_progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_a_worker_error_is_one_clear_error_and_leaves_nothing(prepared, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in prepared[0].iterdir():
        (corpus / path.name).write_bytes(path.read_bytes())
    train_tokenizer = preparation.train_tokenizer

    def train_then_spoil(*args, **kwargs):  # the corpus changes after the checking pass
        model = train_tokenizer(*args, **kwargs)
        (corpus / "doc05.txt").write_bytes(b"\xff" * 100_000)
        return model

    monkeypatch.setattr(preparation, "train_tokenizer", train_then_spoil)
    with pytest.raises(DataError, match=r"doc05\.txt changed or became unreadable during preparation "
                                        r"\(UnicodeDecodeError\); leave the corpus alone and rerun"):
        prepare(tmp_path / "out", corpus=[corpus], vocab_size=VOCAB, show_progress=False, **STREAMED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_vocabulary_too_large_for_the_sample_names_the_cap(prepared, tmp_path):
    corpus = prepared[0]
    with pytest.raises(DataError, match=r"too large for the tokenizer's sample of this corpus \(or raise "
                                        r"--tokenizer-sample-mb\); use at most \d+$"):
        prepare(tmp_path / "out", corpus=[corpus], vocab_size=3000, show_progress=False,
                tokenizer_sample_mb=0.02)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_file_without_final_newline_splits_by_paragraph_in_chunks(tmp_path):
    text = "\n\n".join(_document(seed, paragraphs=3) for seed in range(30)).rstrip("\n")
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare(tmp_path / "out", corpus=[tmp_path / "one.txt"], vocab_size=VOCAB, show_progress=False,
                   **STREAMED)
    tok = load_tokenizer(tmp_path / "out")
    paragraphs = {}
    for split in SPLITS:
        names = meta["splits"][split]["documents"]
        assert names and all(name.startswith("one.txt#") for name in names)
        paragraphs.update(dict.fromkeys(names, split))
        assert meta["splits"][split]["bytes"] == len(tok.decode(load_tokens(tmp_path / "out", split)).encode())
    assert sorted(paragraphs) == [f"one.txt#{i:03d}" for i in range(len(paragraphs))]
    assert sum(meta["splits"][s]["bytes"] for s in SPLITS) == len(text.encode()) + 1  # the supplied newline


def test_cli_prepare_takes_the_streaming_flags(prepared, tmp_path, capsys):
    corpus = prepared[0]
    code = main(["prepare", "--out", str(tmp_path / "out"), "--corpus", str(corpus), "--vocab-size", str(VOCAB),
                 "--workers", "2", "--shard-mb", "0.01", "--chunk-mb", "0.05", "--tokenizer-sample-mb", "0.1"])
    out = capsys.readouterr().out
    assert code == 0
    meta = load_meta(tmp_path / "out")
    assert f"train {meta['splits']['train']['tokens']:,} ({len(meta['splits']['train']['shards'])} shard(s))" in out
    assert meta["tokenizer_sample"]["cap_mb"] == 0.1 and len(meta["splits"]["train"]["shards"]) > 20


def test_task_folders_keep_format_1(tmp_path, monkeypatch):
    """A reasoning task's folder holds no token files: its meta.json stays format 1, so a loopdb
    from before shards can share ~/.cache/loopdb/tasks."""
    monkeypatch.setenv("LOOPDB_DATA", str(tmp_path))
    folder = task_data_dir("s3")
    assert json.loads((folder / "meta.json").read_text())["format"] == 1 == load_meta(folder)["format"]
