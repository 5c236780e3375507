"""Atomic checkpoints inside a run folder (the folder's other files: loopdb.runs.folder).

RUN/
  checkpoints/step-N/    model.safetensors, trainer.pt (optimizer, RNG, step), config.json
  latest                 name of the newest COMPLETE checkpoint

A checkpoint is written into a temporary folder and renamed into place, and
``latest`` is replaced atomically afterwards, so an interrupted save never leaves
a half-written checkpoint behind ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config

KEEP_CHECKPOINTS = 2


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir, model, optimizer, step: int, config: Config, extra: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final, staging = root / name, root / (name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(weights, staging / "model.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "extra": extra or {},
    }
    torch.save(state, staging / "trainer.pt")
    config.save(staging / "config.json")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _atomic_write_text(run_dir / "latest", name)
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "model.safetensors").exists() else None


def load_weights(model, checkpoint: Path) -> None:
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer.pt", weights_only=False)
