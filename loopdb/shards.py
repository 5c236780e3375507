"""Token storage: one split's ids as raw little-endian shard files, read back as one array.

`loopdb prepare` writes each split as ``train-00000.bin``, ``train-00001.bin``, ... in the
dtype its vocabulary needs (uint16 up to 65,535 pieces, uint32 above); every shard but the
last holds exactly ``shard_tokens`` ids. Readers memory-map the shards and see the split as
one stream of ids (`ShardedTokens`): a window may run across a shard boundary, so the
shard size changes the files, never the tokens a seeded reader draws.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError

UINT16_MAX_VOCAB = 65535  # ids 0 .. 65534 in uint16 files; larger vocabularies use uint32
MAX_VOCAB_SIZE = 2**31 - 1  # sentencepiece ids are int32
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """The name of the narrowest dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends ids to a split's shards in ``folder``, starting a new shard every ``shard_tokens``."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int):
        if shard_tokens < 1:
            raise DataError(f"a shard must hold at least one token, got {shard_tokens}")
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, DTYPES[dtype], shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} per shard, as meta.json lists them
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(ids[:room].tobytes())
            self.shards[-1]["tokens"] += len(ids[:room])
            ids = ids[room:]

    def close(self) -> list[dict]:
        """Flush and sync the last shard; the shard list. A split of no ids still gets one (empty) shard."""
        if self._file is None:
            self._open_next()
        self._close_current()
        return self.shards

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def open_shard(path: Path, dtype: str, tokens: int) -> np.ndarray:
    """Read-only memmap of one shard file, checked against the length meta.json records."""
    item = DTYPES[dtype].itemsize
    if not path.is_file():
        raise DataError(f"{path} is missing; rerun `loopdb prepare --out DIR`")
    if path.stat().st_size != item * tokens:
        raise DataError(f"{path} has {path.stat().st_size} bytes but meta.json says {tokens} {dtype} tokens; "
                        "rerun `loopdb prepare --out DIR`")
    if tokens == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=DTYPES[dtype])
    return np.memmap(path, dtype=DTYPES[dtype], mode="r", shape=(tokens,))


class ShardedTokens:
    """Several memmapped shards read as one 1-D array of ids: ``len``, integer and slice
    indexing (a slice may span shards), integer-array indexing (any shape) and ``np.asarray``.
    Every read returns a fresh ndarray; nothing is loaded until it is indexed."""

    ndim = 1

    def __init__(self, shards: list[np.ndarray]):
        if not shards:
            raise DataError("a split needs at least one shard")
        self.shards = shards
        self.dtype = shards[0].dtype
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # shard i holds ids offsets[i] .. offsets[i+1]-1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"index {key} is out of range for {len(self)} tokens")
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return self.shards[shard][index - self.offsets[shard]]
        return self._gather(np.asarray(key))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        for shard in range(max(first, 0), len(self.shards)):
            lo, hi = self.offsets[shard], self.offsets[shard + 1]
            if lo >= stop:
                break
            parts.append(self.shards[shard][max(start, lo) - lo: min(stop, hi) - lo])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if index.dtype.kind not in "iu":
            raise IndexError(f"token arrays are indexed by integers, not {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + len(self), flat)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} tokens")
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(len(flat), dtype=self.dtype)
        for shard in np.unique(shard_of):
            where = shard_of == shard
            out[where] = self.shards[shard][flat[where] - self.offsets[shard]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None):
        whole = self._range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()
