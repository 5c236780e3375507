"""Token windows of a split: random training batches and the evaluation windows that tile it."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


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
