"""A run's tokenizer as a transformers tokenizer (a tokenizers model: nothing of loopdb's at load).

- sentencepiece BPE (loopdb.data.Tokenizer: no normalisation, no dummy prefix, byte fallback, single
  digits, "\n" and "\t" as their own pieces): a tokenizers BPE with the same vocabulary and ids, one
  merge per way a piece splits into two pieces, ranked by the merged piece's id (sentencepiece's BPE
  merges the highest-scoring piece first, and its score falls with its id), spaces as "\u2581";
- characters (loopdb.data.CharTokenizer): a BPE without merges over the alphabet;
- a reasoning task's words (loopdb.tasks.SymbolTokenizer): one id per word, words after a space, "\n" bare.
The export's tests check that each encodes as loopdb's does.

The newline is the beginning- and end-of-text token (lm-eval's prefix of an empty context, as
loopdb's own lm-eval model uses it); it is not a stop token. ``decode(..., skip_special_tokens=True)``
therefore drops newlines: decode generated text with ``skip_special_tokens=False``.
"""

from __future__ import annotations

from pathlib import Path

from ..data.storage import TOKENIZER_FILE, load_meta, load_tokenizer
from ..data.tokenizers import USER_SYMBOLS

SPACE_MARK = "\u2581"


def newline_id(data_dir) -> int:
    return int(load_tokenizer(data_dir).newline_id)


def transformers_tokenizer(data_dir, start_token: bool = False):
    """A ``PreTrainedTokenizerFast`` that encodes every text as the run's tokenizer does; ``start_token``
    (a task run trained with every sequence opened by the newline): it puts the newline in front."""
    tokenizer = load_tokenizer(data_dir)
    if hasattr(tokenizer, "alphabet"):
        return char_tokenizer(tokenizer.alphabet)
    if hasattr(tokenizer, "words"):
        return word_tokenizer(tokenizer.words, start_token)
    meta = load_meta(data_dir)
    return sentencepiece_tokenizer(Path(data_dir) / meta.get("tokenizer", TOKENIZER_FILE))


def _wrap(backend, unknown: str | None, newline: str = "\n"):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    line = AddedToken(newline, special=False, normalized=False)
    pad = unknown if unknown is not None else newline
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unknown, pad_token=pad, bos_token=line,
                                   eos_token=line, clean_up_tokenization_spaces=False)


def sentencepiece_tokenizer(model_file):
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    size = processor.get_piece_size()
    vocab = {processor.id_to_piece(index): index for index in range(size)}
    special = {index for index in range(size) if processor.is_control(index) or processor.is_unknown(index)}
    merges = []
    for index in range(size):
        if index in special or processor.is_byte(index):
            continue
        piece = processor.id_to_piece(index)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((index, vocab[left], vocab[right], left, right))
    merges.sort()
    unknown = processor.id_to_piece(processor.unk_id())
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                               unk_token=unknown, byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", SPACE_MARK)
    bpe.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    bpe.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_tokens([AddedToken(symbol, special=False, normalized=False) for symbol in USER_SYMBOLS])
    return _wrap(bpe, unknown)


def char_tokenizer(alphabet: str):
    """One id per character of ``alphabet`` (a BPE without merges splits a text into characters)."""
    from tokenizers import Tokenizer, decoders, models

    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.decoder = decoders.Fuse()
    return _wrap(backend, None, "\n" if "\n" in alphabet else alphabet[0])


def word_tokenizer(words: list[str], start_token: bool = False):
    """One id per word; a word follows a space, "\n" stands bare (loopdb.tasks' leading-space texts).
    ``start_token``: encoding with special tokens (the default) puts the newline first."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {word if word == "\n" else SPACE_MARK + word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="\n"))
    backend.normalizer = normalizers.Replace(" ", SPACE_MARK)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE_MARK}+"), "merged_with_next")
    backend.decoder = decoders.Replace(SPACE_MARK, " ")
    backend.add_tokens([AddedToken("\n", special=False, normalized=False)])
    if start_token:
        backend.post_processor = processors.TemplateProcessing(single="\n $A", special_tokens=[("\n", vocab["\n"])])
    return _wrap(backend, None)
