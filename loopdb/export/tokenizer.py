"""A run's sentencepiece BPE as a transformers tokenizer (a tokenizers BPE: no sentencepiece at load).

loopdb's tokenizer (loopdb.data) is a sentencepiece BPE with no normalisation, no dummy prefix,
byte fallback, single digits and "\\n", "\\t" as their own pieces. The same BPE in the tokenizers
library: the vocabulary with its ids, one merge per way a piece splits into two pieces, ranked by
the merged piece's id (sentencepiece's BPE merges the highest-scoring piece first, and its score
falls with its id), spaces as "\\u2581", digits split, byte fallback for the rest. The export's
tests check that both encode a play identically.

The newline is the beginning- and end-of-text token (lm-eval's prefix of an empty context, as
loopdb's own lm-eval model uses it); it is not a stop token. ``decode(..., skip_special_tokens=True)``
therefore drops newlines: decode generated text with ``skip_special_tokens=False``.
"""

from __future__ import annotations

from pathlib import Path

from .. import data as data_lib
from ..errors import UsageError

SPACE_MARK = "\u2581"


def _sentencepiece_path(data_dir) -> Path:
    meta = data_lib.load_meta(data_dir)
    path = Path(data_dir) / meta.get("tokenizer", data_lib.TOKENIZER_FILE)
    if meta.get("task") or path.suffix != ".model":
        raise UsageError(f"loopdb export converts sentencepiece tokenizers; {path.name} in {data_dir} is not one "
                         "(prepare the corpus with --tokenizer bpe)")
    return path


def newline_id(data_dir) -> int:
    return int(data_lib.load_tokenizer(data_dir).newline_id)


def transformers_tokenizer(data_dir):
    """A ``PreTrainedTokenizerFast`` that encodes every text as the run's tokenizer does."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_file=str(_sentencepiece_path(data_dir)))
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
    bpe.add_tokens([AddedToken(symbol, special=False, normalized=False) for symbol in data_lib.USER_SYMBOLS])
    newline = AddedToken("\n", special=False, normalized=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=unknown, pad_token=unknown, bos_token=newline,
                                   eos_token=newline, clean_up_tokenization_spaces=False)
