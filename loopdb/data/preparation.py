"""`prepare`: a text corpus into a dataset folder (the layout: loopdb.data).

Preparation streams, so a corpus may be larger than memory: one pass reads every file in
blocks (checks UTF-8, finds empty files, and for a corpus of fewer than three files the
paragraphs); the tokenizer trains on at most ``tokenizer_sample_mb`` of the train split
(all of it when it fits, else evenly spaced line-aligned pieces of the whole split); then
worker processes encode newline-aligned chunks of about ``chunk_mb`` each, in order, into the
shards. No piece spans a newline, so chunking, shard size and worker count never change a
token: the same corpus and settings give the same files. Only lines are held whole, so one
line must fit in memory.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from ..shards import ShardWriter, token_dtype
from .corpus import DEFAULT_CORPUS, Piece, scan_corpus, split_documents
from .storage import CHAR_TOKENIZER_FILE, FORMAT, META_FILE, SPLITS, TOKEN_FILE, TOKENIZER_FILE, default_data_dir
from .tokenizers import DEFAULT_VOCAB_SIZE, TOKENIZERS, CharTokenizer, Tokenizer, check_vocab_size, train_tokenizer

# Streaming (see the module docstring); sizes in MB are 10**6 bytes.
DEFAULT_WORKERS = min(os.cpu_count() or 1, 8)
# Unless --workers is given, a smaller corpus is encoded in-process: starting workers costs
# more than it saves (the shipped 5 MB corpus prepared faster with one process than with two).
PARALLEL_MIN_BYTES = 16_000_000
DEFAULT_TOKENIZER_SAMPLE_MB = 64.0  # the whole train split of the shipped corpus (4.8 MB) fits
DEFAULT_SHARD_MB = 256.0  # bytes of token file per shard
DEFAULT_CHUNK_MB = 4.0  # text per encoding task
ENCODE_BATCH_CHARS = 1 << 18  # a worker encodes (and checks) a task this many characters (+ a line) at a time
MIN_CHUNK_BYTES = 1 << 16  # smaller automatic chunks cost more in hand-offs than they gain
SAMPLE_PIECES = 1024  # pieces of a sampled tokenizer training set (fewer when the cap is small)
MIN_SAMPLE_PIECE = 1 << 14


# -- The train split as one byte stream: the tokenizer's sample ----------------------------------
def _piece_offsets(pieces: list[Piece]) -> np.ndarray:
    """Stream offset of each piece's first byte, then the stream's length."""
    return np.cumsum([0] + [piece.size for piece in pieces])


def _stream_bytes(pieces: list[Piece], offsets: np.ndarray, lo: int, hi: int) -> bytes:
    """Bytes [lo, hi) of the pieces' concatenated text (supplied newlines included)."""
    index, parts = int(np.searchsorted(offsets, lo, side="right")) - 1, []
    while lo < hi and index < len(pieces):
        piece, base = pieces[index], int(offsets[index])
        a, b = lo - base, min(hi - base, piece.size)
        in_file = piece.end - piece.start
        if a < min(b, in_file):
            with piece.path.open("rb") as f:
                f.seek(piece.start + a)
                parts.append(f.read(min(b, in_file) - a))
        if b > in_file:
            parts.append(b"\n")
        lo, index = base + b, index + 1
    return b"".join(parts)


def _tokenizer_sample(pieces: list[Piece], cap_bytes: int) -> tuple[Iterator[str], dict]:
    """(lines to train the tokenizer on, what meta.json records of them).

    The whole train split when it fits in cap_bytes (its non-empty lines in order), else
    about cap_bytes in up to SAMPLE_PIECES evenly spaced pieces of the split, each cut to
    whole lines: deterministic, and spread over the whole corpus rather than its head."""
    offsets = _piece_offsets(pieces)
    total = int(offsets[-1])
    if total <= cap_bytes:
        spans = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(pieces))]
    else:
        count = max(1, min(SAMPLE_PIECES, cap_bytes // MIN_SAMPLE_PIECE))
        length = cap_bytes // count
        spans = [(k * total // count, k * total // count + length) for k in range(count)]
    record = {"bytes": 0, "pieces": len(spans), "whole_train_split": total <= cap_bytes}

    def lines() -> Iterator[str]:
        for lo, hi in spans:
            data = _stream_bytes(pieces, offsets, max(lo - 1, 0), hi)
            if lo > 0 and data[:1] != b"\n":  # starts inside a line: drop that partial line
                data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
            elif lo > 0:
                data = data[1:]
            if hi < total:  # ends inside a line unless it ends on a newline
                data = data[: data.rfind(b"\n") + 1]
            record["bytes"] += len(data)
            yield from (line for line in data.decode("utf-8").split("\n") if line)

    return lines(), record


# -- Encoding: newline-aligned chunks, in worker processes, in order -----------------------------
def _line_cuts(f, start: int, end: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Spans of [start, end) of about chunk_bytes each, cut just after a newline."""
    position = start
    while end - position > chunk_bytes:
        f.seek(position + chunk_bytes - 1)
        cut = position + chunk_bytes - 1
        while True:  # find the next newline without reading a long line whole
            block = f.read(1 << 16)
            found = block.find(b"\n")
            if found >= 0 or not block:
                cut = cut + found + 1 if found >= 0 else end
                break
            cut += len(block)
        if cut >= end:
            break
        yield position, cut
        position = cut
    yield position, end


def _plan_tasks(pieces: list[Piece], chunk_bytes: int) -> list[tuple]:
    """One split's encoding tasks in order; a task is a tuple of (path, start, end, add_newline)
    spans of about chunk_bytes together. Adjacent pieces of one file merge first."""
    ranges = []
    for piece in pieces:
        last = ranges[-1] if ranges else None
        if last and last[0] == piece.path and last[2] == piece.start and not last[3]:
            ranges[-1] = (piece.path, last[1], piece.end, piece.add_newline)
        else:
            ranges.append((piece.path, piece.start, piece.end, piece.add_newline))
    tasks, current, current_bytes = [], [], 0
    for path, start, end, add_newline in ranges:
        with path.open("rb") as f:
            for lo, hi in _line_cuts(f, start, end, chunk_bytes):
                if current and current_bytes + hi - lo > chunk_bytes:
                    tasks.append(tuple(current))
                    current, current_bytes = [], 0
                current.append((str(path), lo, hi, add_newline and hi == end))
                current_bytes += hi - lo
    if current:
        tasks.append(tuple(current))
    return tasks


class _ChunkEncoder:
    """Encodes one task's text to ids, verified to round-trip and to count its bytes."""

    def __init__(self, kind: str, model: bytes, dtype: str):
        self.tokenizer = CharTokenizer.from_bytes(model) if kind == "char" else Tokenizer.from_bytes(model)
        self.dtype = dtype

    def __call__(self, task) -> np.ndarray:
        parts = []
        for path, start, end, add_newline in task:
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    parts.append(f.read(end - start).decode("utf-8") + ("\n" if add_newline else ""))
            except (OSError, UnicodeDecodeError) as error:  # it passed the checking pass
                raise DataError(f"{path} changed or became unreadable during preparation "
                                f"({type(error).__name__}); leave the corpus alone and rerun") from None
        text, where = "".join(parts), f"{task[0][0]} from byte {task[0][1]}"
        pieces, position = [], 0
        while position < len(text):  # a batch of whole lines at a time: few ids are ever Python ints
            cut = text.find("\n", position + ENCODE_BATCH_CHARS)
            cut = len(text) if cut < 0 else cut + 1
            pieces.append(self._encode_checked(text[position:cut], where))
            position = cut
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def _encode_checked(self, text: str, where: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode(text), dtype=self.dtype)
        if self.tokenizer.decode(ids) != text:
            raise DataError(f"the text of {where} does not round-trip through the tokenizer; "
                            "report this corpus as a bug")
        if int(self.tokenizer.token_bytes[ids].sum()) != len(text.encode("utf-8")):
            raise DataError(f"token byte lengths of {where} do not add up; report this corpus as a bug")
        return ids


@contextlib.contextmanager
def _worker_pool(workers: int):
    """``workers`` encoding processes, or None (encode in-process) for one.

    Spawned, not forked: a fresh worker holds only numpy and sentencepiece, not the parent's
    torch, sentencepiece training memory or threads, on every platform. Started before the
    tokenizer trains, while this process is small: a spawned process's ru_maxrss starts at the
    parent's RSS at the fork before its exec, so late workers would report the parent's peak."""
    if workers == 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


_WORKER_ENCODER: tuple | None = None  # (encoder args, _ChunkEncoder) of a worker process, from its first task


def _encode_in_worker(encoder_args: tuple, task) -> np.ndarray:
    global _WORKER_ENCODER
    if _WORKER_ENCODER is None or _WORKER_ENCODER[0] != encoder_args:
        _WORKER_ENCODER = (encoder_args, _ChunkEncoder(*encoder_args))
    return _WORKER_ENCODER[1](task)


def _encode_in_order(tasks: list, pool, workers: int, encoder_args: tuple) -> Iterator[np.ndarray]:
    """ids of each task, in task order; at most 2 * workers tasks in flight, so memory stays
    bounded however far the workers run ahead."""
    if pool is None:
        yield from map(_ChunkEncoder(*encoder_args), tasks)
        return
    in_flight = collections.deque()
    for task in tasks:
        in_flight.append(pool.apply_async(_encode_in_worker, (encoder_args, task)))
        if len(in_flight) >= 2 * workers:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def _unigram_bpb(train_counts: np.ndarray, test_counts: np.ndarray, test_bytes: int) -> float:
    """Bits per byte of test under add-one smoothed train unigram counts."""
    log2_p = np.log2((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    return float(-(test_counts * log2_p).sum() / test_bytes)


# -- Writing the dataset directory ---------------------------------------------------------------
def _is_dataset_file(name: str) -> bool:
    return name in (TOKENIZER_FILE, CHAR_TOKENIZER_FILE, META_FILE) or TOKEN_FILE.fullmatch(name) is not None


def _check_out_dir(out: Path) -> None:
    """Refuse to replace anything but a (possibly empty) prepared dataset."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out} exists and is not a dataset folder; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if not _is_dataset_file(p.name))
    if foreign:
        raise DataError(
            f"{out} holds files that are not a prepared dataset (e.g. {foreign[0]}); "
            "choose another --out or empty that folder"
        )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fresh_dir(out: Path, kind: str) -> Path:
    """A new hidden folder beside out (mkdir, unlike mkdtemp, honours the umask)."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _install(tmp: Path, out: Path) -> None:
    """Rename tmp to out, replacing an existing prepared dataset."""
    _check_out_dir(out)  # again: the folder may have changed while we worked
    if not out.exists():
        os.rename(tmp, out)
        return
    old_parent = _fresh_dir(out, "old")
    old = old_parent / out.name
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        shutil.rmtree(old_parent, ignore_errors=True)
        raise
    shutil.rmtree(old_parent, ignore_errors=True)


# -- prepare -------------------------------------------------------------------------------------
def _progress(show: bool):
    def say(message: str) -> None:
        if show:
            print(f"[loopdb prepare] {message}", file=sys.stderr, flush=True)

    return say


def _megabytes(value, flag: str) -> int:
    """A positive size given in MB, as bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise DataError(f"{flag} must be a positive number of MB, got {value!r}")
    return max(1, int(value * 1e6))


def _check_workers(workers) -> int | None:
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers!r}")
    return workers


def prepare(out_dir, corpus=None, vocab_size=DEFAULT_VOCAB_SIZE, show_progress=True, tokenizer: str = "bpe", *,
            workers: int | None = None, tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB,
            shard_mb: float = DEFAULT_SHARD_MB, chunk_mb: float = DEFAULT_CHUNK_MB,
            timings: dict | None = None) -> dict:
    """Build a dataset folder from a corpus; returns the meta dict (= meta.json).

    corpus: None or "shakespeare" for the default corpus, else a list of files
    and folders (folders are read recursively, hidden files skipped).
    tokenizer: "bpe" (sentencepiece, ``vocab_size`` pieces) or "char" (one id per
    character; ``vocab_size`` is ignored). Nothing is written unless everything succeeds.
    workers: encoding processes (default min(cpu_count, 8); 1 for a corpus under
    PARALLEL_MIN_BYTES); tokenizer_sample_mb: the most train text the BPE tokenizer trains on;
    shard_mb: token file bytes per shard; chunk_mb: text per encoding task. Workers, shard_mb
    and chunk_mb never change a token (see the module docstring); tokenizer_sample_mb changes
    the tokenizer once the train split is larger than it. timings: a dict
    that receives the seconds of each phase (check, tokenizer, encode), for benchmarks.
    """
    say = _progress(show_progress)
    out = Path(out_dir)
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe":
        vocab_size = check_vocab_size(vocab_size)
    workers = _check_workers(workers)
    sample_bytes = _megabytes(tokenizer_sample_mb, "--tokenizer-sample-mb")
    shard_bytes, chunk_bytes = _megabytes(shard_mb, "--shard-mb"), _megabytes(chunk_mb, "--chunk-mb")
    _check_out_dir(out)

    timings = {} if timings is None else timings
    started = time.perf_counter()
    alphabet = set() if tokenizer == "char" else None
    label, docs = scan_corpus(corpus, say, alphabet)
    splits = split_documents(docs, default_corpus=label == DEFAULT_CORPUS)
    n_bytes = {split: sum(piece.size for piece in splits[split]) for split in SPLITS}
    say("documents: " + ", ".join(f"{s} {len(splits[s])} ({n_bytes[s] / 1e6:.2f} MB)" for s in SPLITS))
    if workers is None:
        workers = DEFAULT_WORKERS if sum(n_bytes.values()) >= PARALLEL_MIN_BYTES else 1
    timings["check"], started = time.perf_counter() - started, time.perf_counter()
    with _worker_pool(workers) as pool:  # started now, while this process is small (see there)
        sample = None
        if tokenizer == "char":
            chars = CharTokenizer("".join(sorted(alphabet)))
            say(f"character tokenizer: {chars.vocab_size} characters")
            tokenizer_file, model, tokenizer = CHAR_TOKENIZER_FILE, chars.to_bytes(), chars
        else:
            lines, sample = _tokenizer_sample(splits["train"], sample_bytes)
            whole = "the train split" if sample["whole_train_split"] else \
                f"a {sample_bytes / 1e6:g} MB sample of the train split ({sample['pieces']} pieces)"
            say(f"training a {vocab_size}-piece BPE tokenizer on {whole}")
            model = train_tokenizer(lines, vocab_size, sampled=not sample["whole_train_split"])
            tokenizer_file, tokenizer = TOKENIZER_FILE, Tokenizer.from_bytes(model)
        kind = "char" if tokenizer_file == CHAR_TOKENIZER_FILE else "bpe"
        timings["tokenizer"], started = time.perf_counter() - started, time.perf_counter()
        dtype = token_dtype(tokenizer.vocab_size)
        shard_tokens = max(1, shard_bytes // np.dtype(dtype).itemsize)

        # Enough tasks to keep every worker busy, however small the corpus.
        chunk_bytes = min(chunk_bytes, max(MIN_CHUNK_BYTES, sum(n_bytes.values()) // (4 * workers)))
        tasks = [(split, task) for split in SPLITS for task in _plan_tasks(splits[split], chunk_bytes)]
        say(f"encoding {len(tasks)} chunks with {workers} worker(s) into {dtype} shards")

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(out, "tmp")
        try:
            _write_file(tmp / tokenizer_file, model)
            writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
            counts = {split: np.zeros(tokenizer.vocab_size, dtype=np.int64) for split in ("train", "test")}
            encoded = _encode_in_order([task for _, task in tasks], pool, workers, (kind, model, dtype))
            with contextlib.closing(encoded), tqdm(total=sum(n_bytes.values()), unit="B", unit_scale=True,
                                                   desc="encode", disable=not show_progress) as bar:
                for (split, task), ids in zip(tasks, encoded):
                    writers[split].write(ids)
                    if split in counts:
                        counts[split] += np.bincount(ids, minlength=tokenizer.vocab_size)
                    bar.update(sum(end - start + add for _, start, end, add in task))
            meta = {
                "format": FORMAT,
                "corpus": label,
                "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer_file,
                "dtype": dtype,
                "splits": {
                    split: {
                        "documents": [piece.name for piece in splits[split]],
                        "tokens": sum(shard["tokens"] for shard in writers[split].shards),
                        "bytes": n_bytes[split],
                        "shards": writers[split].close(),
                    }
                    for split in SPLITS
                },
                "unigram_test_bpb": _unigram_bpb(counts["train"], counts["test"], n_bytes["test"]),
            }
            if sample is not None:
                meta["tokenizer_sample"] = {"cap_mb": sample_bytes / 1e6, **sample}
            _write_file(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
            _install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        timings["encode"] = time.perf_counter() - started
        say(
            "wrote "
            + str(out)
            + ": "
            + ", ".join(f"{s} {meta['splits'][s]['tokens']:,} tokens" for s in SPLITS)
            + f"; unigram test bpb {meta['unigram_test_bpb']:.3f}"
        )
        return meta


def resolve_data_dir(data: str | None, vocab_size: int) -> Path:
    """--data, or the default corpus, prepared on first use."""
    if data:
        return Path(data)
    data_dir = default_data_dir(vocab_size)
    if not (data_dir / META_FILE).exists():
        print(f"preparing the default corpus into {data_dir} (once)", file=sys.stderr)
        prepare(data_dir, vocab_size=vocab_size)
    return data_dir
