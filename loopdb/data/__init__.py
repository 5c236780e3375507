"""Text data: a corpus prepared into a dataset folder, its tokenizer, and windows of its tokens.

`preparation.prepare` turns a text corpus into a dataset directory:

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

The modules, from the bottom up:

    corpus.py        the corpus files: discovery, the checking pass, the train/val/test split
    tokenizers.py    the sentencepiece BPE and character tokenizers
    storage.py       the dataset folder: file names, the cache root, reading meta.json, tokens, tokenizer
    preparation.py   `prepare`: the tokenizer's sample, encoding in worker processes, writing the folder
    windows.py       token windows for training batches and evaluation (the only module that needs torch)

This file imports nothing: `prepare`'s worker processes import the data modules they need and
no more (no torch).
"""
