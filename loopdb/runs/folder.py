"""The run folder, and its one owner: what `loopdb train` writes there besides checkpoints,
and how every command opens a run (its config, its data, its newest model).

RUN/
  config.json            resolved config of the run
  data.json              where its prepared data lives (null: the family's embedded data), and the
                         preset it was trained from (null: unrecorded)
  checkpoints/, latest   loopdb.runs.checkpoint
  metrics.jsonl, tb/     evaluation log (a row per evaluated step) and tensorboard events (loopdb.training.trainer)
  train.lock             held by the process training the run (loopdb.runs.lock)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config
from ..device import keep_freed_memory
from ..errors import ConfigError, RunError
from ..families import build_model
from .checkpoint import _atomic_write_text, checkpoints, latest_checkpoint, load_config, load_weights, verify_checkpoint

RUN_CONFIG, DATA_POINTER, METRICS = "config.json", "data.json", "metrics.jsonl"
SAMPLER_KEYS = ("grid", "solver", "grid_sigma_last", "estimate", "wavefront")  # may change after training


def write_run_files(run_dir, config: Config, data_dir: Path | None, preset: str | None = None) -> None:
    """The run folder's config.json and data.json (where its data lives, None: the family's embedded
    data; the preset the run was started from, None: the one recorded before, if any)."""
    run_dir = Path(run_dir)
    if preset is None and (run_dir / DATA_POINTER).exists():
        preset = run_preset(run_dir)
    _atomic_write_text(run_dir / RUN_CONFIG, json.dumps(config.to_dict(), indent=2))
    pointer = {"data_dir": None if data_dir is None else str(Path(data_dir).resolve()), "preset": preset}
    _atomic_write_text(run_dir / DATA_POINTER, json.dumps(pointer))


def _metrics_rows(run_dir) -> list[tuple[int, str]]:
    """(step, line) of metrics.jsonl's complete rows; a line cut short by a kill is left out."""
    path = Path(run_dir) / METRICS
    rows = []
    for line in path.read_text().splitlines(keepends=True) if path.exists() else []:
        try:
            rows.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue
    return [(step, line) for step, line in rows if line.endswith("\n")]


def keep_metrics_through(run_dir, step: int) -> None:
    """Drop metrics.jsonl's rows after ``step`` (a resumed run logs those steps again), atomically."""
    if (Path(run_dir) / METRICS).exists():
        kept = [line for row_step, line in _metrics_rows(run_dir) if row_step <= step]
        _atomic_write_text(Path(run_dir) / METRICS, "".join(kept))


def last_metrics_step(run_dir) -> int | None:
    """The step of metrics.jsonl's newest row (None: no row)."""
    rows = _metrics_rows(run_dir)
    return rows[-1][0] if rows else None


def _data_pointer(run_dir) -> dict:
    path = Path(run_dir) / DATA_POINTER
    if not path.exists():
        raise RunError(f"{run_dir} has no {DATA_POINTER}; was it made by `loopdb train`?")
    return json.loads(path.read_text())


def run_data_dir(run_dir) -> Path | None:
    """The data folder data.json names (None: the family's embedded data, e.g. the digits)."""
    data_dir = _data_pointer(run_dir)["data_dir"]
    return None if data_dir is None else Path(data_dir)


def run_preset(run_dir) -> str | None:
    """The preset the run was started from (None: unrecorded, e.g. a run made through the library)."""
    return _data_pointer(run_dir).get("preset")


def open_run(run_dir) -> tuple[Config, Path]:
    """Config and newest checkpoint of a run; RunError with the fix if it is not a finished-enough run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist; train one with `loopdb train --preset tiny --out {run_dir}`")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RunError(f"{run_dir} holds no checkpoint yet; train it first (or pass the folder given to --out)")
    try:
        verify_checkpoint(checkpoint)
        return load_config(checkpoint), checkpoint
    except RunError as error:
        raise RunError(f"{error}; {_repair_hint(run_dir, checkpoint)}") from None


def _repair_hint(run_dir: Path, damaged: Path) -> str:
    """How to get a usable run back from a damaged newest checkpoint."""
    older = [path.name for path in checkpoints(run_dir) if path.name < damaged.name]
    resume = f"`loopdb train --out {run_dir} --resume` (same --preset and --data as the run)"
    if older:
        return f"{resume} falls back to the checkpoint before it ({older[0]}, if intact) and retrains from there"
    return "restore the file from a copy, or retrain (the run has no earlier checkpoint)"


def load_model(run_dir, device="cpu", sampler: dict[str, str] | None = None):
    """The run's newest model, in eval mode on ``device``; returns (model, config). A damaged newest
    checkpoint is refused (RunError naming the file and the fix), never silently replaced.

    ``sampler`` overrides inference-only settings (SAMPLER_KEYS), e.g. {"grid_sigma_last": "0.5"}.
    A run being trained may replace its newest checkpoint while it is read: then the new one is read."""
    if sampler:
        fixed = sorted(set(sampler) - set(SAMPLER_KEYS))
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change after training; at inference only "
                              f"{', '.join(SAMPLER_KEYS)} can")
    for attempt in range(3):
        checkpoint = latest_checkpoint(run_dir)
        try:
            config, checkpoint = open_run(run_dir)
            if sampler:
                config.apply_overrides(sampler)
            model = build_model(config)
            try:  # a checkpoint without a manifest is only found damaged here, when it does not parse
                load_weights(model, checkpoint)
            except RunError as error:
                raise RunError(f"{error}; {_repair_hint(Path(run_dir), checkpoint)}") from None
            break
        except RunError:
            if attempt == 2 or checkpoint is None or latest_checkpoint(run_dir) == checkpoint:
                raise  # damaged, not replaced by a training that moved on
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # scoring allocates the same large logits every batch, as training does
    return model.to(device).eval(), config
