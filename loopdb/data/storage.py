"""The dataset folder: its file names and format, where prepared data is cached, and reading it back."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from ..errors import DataError
from ..shards import ShardedTokens, open_shard
from ..tasks import SymbolTokenizer, get_task
from .tokenizers import CharTokenizer, Tokenizer

SPLITS = ("train", "val", "test")
FORMAT = 2  # 2: sharded token files listed in meta.json; 1: one uint16 {split}.bin (still read)
READABLE_FORMATS = (1, 2)
# A task folder holds no token files, so its layout is format 1's still; keeping the number lets
# older loopdb versions share ~/.cache/loopdb/tasks (each rewrites a meta.json that differs).
TASK_FORMAT = 1
TOKENIZER_FILE = "tokenizer.model"
CHAR_TOKENIZER_FILE = "tokenizer.json"
TASK_TOKENIZER_FILE = "words.json"
META_FILE = "meta.json"
TOKEN_FILE = re.compile(r"(train|val|test)(-\d{5})?\.bin")  # shards, and format 1's single files


def cache_root() -> Path:
    """Where prepared data is kept: $LOOPDB_DATA, else ~/.cache/loopdb."""
    return Path(os.environ.get("LOOPDB_DATA", Path.home() / ".cache" / "loopdb"))


def default_data_dir(vocab_size: int) -> Path:
    """Where the default corpus is prepared (under the cache root)."""
    return cache_root() / f"shakespeare-bpe{vocab_size}"


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
    task = get_task(task_name)
    out = cache_root() / "tasks" / task.name
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
        return SymbolTokenizer.from_bytes(path.read_bytes())
    if path.name == CHAR_TOKENIZER_FILE:
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; rerun `loopdb prepare --tokenizer char --out DIR`")
        return CharTokenizer.from_bytes(path.read_bytes())
    return Tokenizer(path)
