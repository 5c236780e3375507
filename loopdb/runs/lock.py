"""One training at a time in a run folder: an OS lock on RUN/train.lock held by the training process.

The lock is ``fcntl.flock`` on an open file, so the kernel drops it when the process ends, however
it ends (an error, a crash, kill -9): the file left behind never blocks a later ``--resume``. The
file holds the holder's pid and host, for the refusal. Readers (score, sample, eval, export) never
take the lock: a checkpoint is complete before ``latest`` names it, so they read while a run trains.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import RunError

LOCK_FILE = "train.lock"
_held: dict[Path, int] = {}  # run folder -> the descriptor holding its lock in this process


def refuse_if_trained(run_dir) -> None:
    """RunError naming the holder if another process trains ``run_dir`` now; writes nothing."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    try:
        descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        _lock(descriptor, run_dir)
    finally:
        os.close(descriptor)  # drops the lock just taken


def hold_run_folder(run_dir) -> None:
    """Lock ``run_dir`` (created if needed) for this process until release_run_folder or exit.
    Holding it already is fine (one process may open a run for training several times); RunError
    naming the holder's pid and host if another process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        _lock(descriptor, run_dir)
    except RunError:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _held[run_dir] = descriptor


def _lock(descriptor: int, run_dir: Path) -> None:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(f"{run_dir} is being trained by {_holder(descriptor)}; wait for it to end or stop it "
                       "(Ctrl-C, or kill its pid), then continue with --resume, or train into another --out") from None


def release_run_folder(run_dir) -> None:
    """Drop this process's lock on ``run_dir`` (closing the descriptor releases it)."""
    descriptor = _held.pop(Path(run_dir).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)


def _holder(descriptor: int) -> str:
    """'pid P on host H' from the lock file (the holder may not have written it yet)."""
    try:
        text = os.pread(descriptor, 4096, 0).decode()
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not written yet)"
