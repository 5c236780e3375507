"""Atomic, verified checkpoints inside a run folder (the folder's other files: loopdb.runs.folder).

RUN/
  checkpoints/step-N/    model.safetensors, trainer.pt (optimizer, RNG, step), config.json,
                         manifest.json (size and sha256 of every other file)
                         distributed/ (multi-process runs): torch.distributed.checkpoint shards of
                         every rank's weights and optimizer state; trainer.pt then holds no optimizer
  latest                 name of the newest COMPLETE checkpoint

A checkpoint is written into a temporary folder and renamed into place, and ``latest`` is
replaced atomically afterwards, so an interrupted or failed save (a kill, a full disk) never
leaves a half-written checkpoint behind ``latest``. The manifest catches what happens to the
files afterwards (a truncated copy, a bad disk): readers verify it before trusting a checkpoint,
and a resumed run falls back to the newest checkpoint that is intact. A checkpoint written
before manifests existed still loads (unverified: a file that cannot be parsed is still refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import RunError

KEEP_CHECKPOINTS = 2
WEIGHTS, TRAINER_STATE, CONFIG, MANIFEST = "model.safetensors", "trainer.pt", "config.json", "manifest.json"
DISTRIBUTED = "distributed"  # the folder of a multi-process run's shards (torch.distributed.checkpoint)
CHECKSUMMED = (WEIGHTS, TRAINER_STATE, CONFIG)
MANIFEST_FORMAT = 1
_NAME = re.compile(r"step-\d+")  # a complete checkpoint's folder (staging ones carry a suffix)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def non_finite_weights(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [key for key, value in state_dict.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    shards = sorted(path.relative_to(folder).as_posix() for path in (folder / DISTRIBUTED).rglob("*") if path.is_file())
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in (*CHECKSUMMED, *shards)}
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=2))


def staging_folder(run_dir, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return Path(run_dir) / "checkpoints" / (checkpoint_name(step) + ".tmp")


def start_checkpoint(run_dir, step: int) -> Path:
    """An empty staging folder for checkpoint ``step``, where every rank of a multi-process run
    writes its shards (save_distributed_state) before rank 0 completes it (save_checkpoint, staged)."""
    staging = staging_folder(run_dir, step)
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise _save_failed(Path(run_dir), checkpoint_name(step), error) from None
    return staging


def save_checkpoint(run_dir, model, optimizer, step: int, config: Config, extra: dict | None = None,
                    weights: dict | None = None, staged: bool = False) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; keep the newest KEEP_CHECKPOINTS.
    ``weights``: the whole model's state (default ``model.state_dict()``); ``staged``: complete the
    folder start_checkpoint made, whose shards are already written.

    RunError, with ``latest`` and the previous checkpoint untouched, if a weight is non-finite
    or the write fails (e.g. the disk is full)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    name = checkpoint_name(step)
    final, staging, replaced = root / name, staging_folder(run_dir, step), root / (name + ".replaced")
    weights = {key: value.detach().contiguous().cpu()
               for key, value in (model.state_dict() if weights is None else weights).items()}
    bad = non_finite_weights(weights)
    if bad:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunError(f"refusing to save checkpoint {name}: {len(bad)} weight tensor(s) are non-finite "
                       f"(first: {bad[0]}); {_still_latest(run_dir)}")
    if not staged:
        start_checkpoint(run_dir, step)
    try:
        save_file(weights, staging / WEIGHTS)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "extra": extra or {},
        }
        torch.save(state, staging / TRAINER_STATE)
        config.save(staging / CONFIG)
        _write_manifest(staging, step)
        if final.exists():  # the same step saved again (a stop right after a save): set the old copy aside first
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _atomic_write_text(run_dir / "latest", name)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _save_failed(run_dir, name, error) from None
    shutil.rmtree(replaced, ignore_errors=True)
    for old in checkpoints(run_dir)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_failed(run_dir: Path, name: str, error: OSError) -> RunError:
    reason = f"{error.strerror} ({error.filename})" if error.strerror else str(error)
    return RunError(f"could not save checkpoint {name}: {reason}; {_still_latest(run_dir)}; "
                    "free some space, then continue with --resume")


# -- the shards of a multi-process run (torch.distributed.checkpoint) ----------------------------
def _state_dict_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # optimizer state keyed by parameter name, so ranks holding different parameters never share a key
    return StateDictOptions(flatten_optimizer_state_dict=True, **options)


def _distributed_state(model, optimizer) -> dict:
    """This rank's weights (sharded or plain; not the blocks it does not hold) and optimizer state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    return {"model": {key: value for key, value in weights.items() if not value.is_meta}, "optimizer": optimizer_state}


def save_distributed_state(staging: Path, model, optimizer) -> None:
    """Every rank, together: write its share into ``staging`` (from start_checkpoint); a tensor that
    several ranks hold alike (data-parallel weights, shared parameters) is written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(_distributed_state(model, optimizer), checkpoint_id=staging / DISTRIBUTED)
    except (OSError, CheckpointException) as error:  # raised on every rank when any rank fails
        raise RunError(f"could not save the shards of checkpoint {staging.name.removesuffix('.tmp')}: {_first_line(error)}; "
                       f"{_still_latest(staging.parent.parent)}") from None


def _first_line(error: BaseException) -> str:
    """One line for an error; a CheckpointException's is that of the first rank's failure."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, failure = next(iter(failures.items()))
        failure = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        return f"rank {rank}: {_first_line(failure)}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def has_distributed_state(checkpoint) -> bool:
    return (Path(checkpoint) / DISTRIBUTED).is_dir()


def _parameter_of(state_key: str) -> str:
    """'state.<parameter name>.<statistic>' -> the parameter name (AdamW's statistics have no dots)."""
    return state_key.removeprefix("state.").rsplit(".", 1)[0]


def load_distributed_state(checkpoint, model, optimizer) -> None:
    """Load this rank's share of a multi-process checkpoint into ``model`` and ``optimizer`` (the
    ranks may split the model as the saving run did or otherwise; one process loads it all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = Path(checkpoint) / DISTRIBUTED
    state = _distributed_state(model, optimizer)  # gives every parameter AdamW state to load into
    try:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        # a parameter that never had a gradient had no AdamW state when saved, and gets none now
        with_state = {_parameter_of(key.removeprefix("optimizer.")) for key in saved if key.startswith("optimizer.state.")}
        for name, parameter in model.named_parameters():
            if name not in with_state:
                optimizer.state.pop(parameter, None)
        state["optimizer"] = {key: value for key, value in state["optimizer"].items()
                              if not key.startswith("state.") or _parameter_of(key) in with_state}
        with warnings.catch_warnings():  # one process reading a multi-process checkpoint is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder)
    except (OSError, RuntimeError, CheckpointException) as error:
        raise _damaged(Path(checkpoint) / DISTRIBUTED, _first_line(error)) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_dict_options(strict=False))  # strict=False: the blocks a rank does not hold
    for parameter in [p for p, p_state in optimizer.state.items() if not p_state]:
        del optimizer.state[parameter]  # as the saving run had it: no state until a first gradient


def _still_latest(run_dir: Path) -> str:
    pointer = run_dir / "latest"
    if not pointer.exists():
        return "no earlier checkpoint exists"
    return f"the previous checkpoint {pointer.read_text().strip()} is untouched and still `latest`"


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint folder ``latest`` names (None: no checkpoint was ever completed); it may be
    damaged or missing: verify_checkpoint says."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    return Path(run_dir) / "checkpoints" / (pointer.read_text().strip() or "(empty latest)")


def checkpoints(run_dir) -> list[Path]:
    """Every complete-looking checkpoint folder of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), reverse=True)


def _damaged(path: Path, problem: str) -> RunError:
    return RunError(f"checkpoint file {path} is damaged ({problem})")


def verify_checkpoint(checkpoint) -> bool:
    """Check the checkpoint's files against its manifest: True if verified, False for a checkpoint
    without a manifest (written before manifests; its files are only checked to exist).
    RunError naming the damaged file otherwise."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise RunError(f"checkpoint folder {checkpoint} is missing")
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.exists():
        for name in CHECKSUMMED:
            if not (checkpoint / name).is_file():
                raise _damaged(checkpoint / name, "missing")
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged(manifest_path, f"unreadable: {error}") from None
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise _damaged(path, "missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise _damaged(path, f"{size} bytes, the manifest says {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise _damaged(path, "its sha256 differs from the manifest's")
    return True


def _read(path: Path, reader):
    """A checkpoint file's content; a file that cannot be parsed is damaged (an unverified one can be)."""
    try:
        return reader(path)
    except Exception as error:  # any failure to parse the file: safetensors, pickle, zip, json errors
        raise _damaged(path, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def load_weights(model, checkpoint: Path) -> None:
    model.load_state_dict(_read(Path(checkpoint) / WEIGHTS, load_file))


def load_trainer_state(checkpoint: Path) -> dict:
    return _read(Path(checkpoint) / TRAINER_STATE, lambda path: torch.load(path, weights_only=False))


def load_config(checkpoint: Path) -> Config:
    return _read(Path(checkpoint) / CONFIG, Config.load)


@dataclass
class Saved:
    """A checkpoint read whole into memory, every file verified or parsed."""
    path: Path
    config: Config
    weights: dict
    trainer_state: dict


def read_checkpoint(checkpoint) -> Saved:
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    return Saved(checkpoint, load_config(checkpoint), _read(checkpoint / WEIGHTS, load_file),
                 load_trainer_state(checkpoint))


def newest_intact_checkpoint(run_dir, warn: Callable[[str], None]) -> Saved | None:
    """The checkpoint to resume from: the one ``latest`` names if it is intact, else (with a
    warning for each damaged one) the newest intact other one; None if the run has none."""
    named = latest_checkpoint(run_dir)
    candidates = ([named] if named is not None else []) + [p for p in checkpoints(run_dir) if p != named]
    for candidate in candidates:
        try:
            return read_checkpoint(candidate)
        except RunError as error:
            warn(f"{error}; trying the checkpoint before it")
    return None
