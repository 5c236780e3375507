"""Which torch device a command runs on: the one place that reads ``--device``."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; otherwise the named device,
    refused in one line when it is CUDA and none is here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use --device=cpu")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS; True where it applied.

    A CPU training or scoring loop allocates and frees the same large activations every step.
    By default glibc serves blocks over its mmap threshold (32 MiB at most) with fresh mappings
    and trims the heap's free top, so every step page-faults tens of megabytes back in: at the
    bench's dims (d=256, T=256, batch 16) that was 15-30% of a step's time. With no mmap and no
    trimming, a step reuses the heap the previous one freed; the cost is that the process keeps
    its peak memory until it exits. Linux with glibc only (elsewhere: nothing changes)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        no_mmap = bool(libc.mallopt(_M_MMAP_MAX, 0))
        return no_mmap and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # a C int: its largest value
    except (OSError, AttributeError):  # musl or another libc: no mallopt
        return False
