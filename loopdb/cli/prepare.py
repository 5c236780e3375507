"""``loopdb prepare``: tokenize a corpus into a data folder (loopdb.data.preparation)."""

from __future__ import annotations

from ..data.tokenizers import DEFAULT_VOCAB_SIZE, TOKENIZERS

def add_parser(commands) -> None:
    p = commands.add_parser("prepare", help="tokenize a corpus into a data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", nargs="+", default=None, help="'shakespeare' (default) or text files / folders")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe",
                   help="bpe (sentencepiece, --vocab-size pieces) or char (one id per character: bits per character)")
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes (default: min(CPU count, 8); 1 for a corpus under 16 MB)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="the BPE tokenizer trains on at most this much of the train split, sampled evenly across "
                        "it (default 64)")
    p.add_argument("--shard-mb", type=float, default=None, help="token file size per shard (default 256)")
    p.add_argument("--chunk-mb", type=float, default=None, help="text per encoding task (default 4)")
    p.set_defaults(handler=run, takes_overrides=False)


def run(args) -> int:
    from ..data.preparation import prepare
    from ..data.storage import SPLITS

    corpus = None if args.corpus in (None, ["shakespeare"]) else args.corpus
    streaming = {key: getattr(args, key) for key in ("workers", "tokenizer_sample_mb", "shard_mb", "chunk_mb")
                 if getattr(args, key) is not None}  # unset: loopdb.data.preparation's defaults
    meta = prepare(args.out, corpus=corpus, vocab_size=args.vocab_size, tokenizer=args.tokenizer, **streaming)
    splits = meta["splits"]
    print(f"prepared {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), tokens "
          + ", ".join(f"{name} {splits[name]['tokens']:,} ({len(splits[name]['shards'])} shard(s))"
                      for name in SPLITS))
    print(f"unigram test bits per byte (the no-context line): {meta['unigram_test_bpb']:.3f}")
    return 0
