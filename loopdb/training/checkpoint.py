"""Run folders and atomic checkpoints.

RUN/
  config.json            resolved config of the run
  data.json              where its prepared data lives
  checkpoints/step-N/    model.safetensors, trainer.pt (optimizer, RNG, step), config.json
  latest                 name of the newest COMPLETE checkpoint
  metrics.jsonl, tb/     evaluation log and tensorboard events

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


class RunError(ValueError):
    pass


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


def open_run(run_dir) -> tuple[Config, Path]:
    """Config and newest checkpoint of a run; RunError with the fix if it is not a finished-enough run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist; train one with `loopdb train --preset tiny --out {run_dir}`")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RunError(f"{run_dir} holds no checkpoint yet; train it first (or pass the folder given to --out)")
    return Config.load(checkpoint / "config.json"), checkpoint


def run_data_dir(run_dir) -> Path | None:
    """The run's data folder (None: the family's embedded data, e.g. the digits)."""
    path = Path(run_dir) / "data.json"
    if not path.exists():
        raise RunError(f"{run_dir} has no data.json; was it made by `loopdb train`?")
    data_dir = json.loads(path.read_text())["data_dir"]
    return None if data_dir is None else Path(data_dir)


SAMPLER_KEYS = ("grid", "solver", "grid_sigma_last", "estimate")  # may change after training


def load_model(run_dir, device="cpu", sampler: dict[str, str] | None = None):
    """The run's newest model, in eval mode on ``device``; returns (model, config).

    ``sampler`` overrides inference-only settings (SAMPLER_KEYS), e.g. {"grid_sigma_last": "0.5"}."""
    from ..config import ConfigError
    from ..families import build_model

    config, checkpoint = open_run(run_dir)
    if sampler:
        fixed = sorted(set(sampler) - set(SAMPLER_KEYS))
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change after training; at inference only "
                              f"{', '.join(SAMPLER_KEYS)} can")
        config.apply_overrides(sampler)
    model = build_model(config)
    load_weights(model, checkpoint)
    return model.to(device).eval(), config
