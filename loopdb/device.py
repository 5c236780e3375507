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
