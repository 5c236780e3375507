"""The tokenizers: sentencepiece BPE (trained here) and one id per character.

Both round-trip text exactly and give every id a fixed UTF-8 byte length (``token_bytes``),
so a model's loss converts exactly into bits per byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm

from ..errors import DataError
from ..shards import MAX_VOCAB_SIZE

DEFAULT_VOCAB_SIZE = 4096
TOKENIZERS = ("bpe", "char")
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


def opened_prompt(ids, newline_id: int, start_token: bool = False) -> list[int]:
    """The tokens a prompt is conditioned on: the newline (the document start) for an empty prompt,
    and in front of any prompt that lacks it for a model trained with ``start_token``."""
    ids = list(ids)
    if not ids or (start_token and ids[0] != newline_id):
        return [newline_id, *ids]
    return ids


def check_vocab_size(vocab_size) -> int:
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


def train_tokenizer(lines: Iterator[str], vocab_size: int, sampled: bool = False) -> bytes:
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
