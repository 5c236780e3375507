"""What ``loopdb train --resume`` may change. A resume continues the run's model on the run's data,
so a command line (preset and overrides) that would change either is refused in one line naming
the keys; the settings in RESUMABLE (how long and how fast it trains, how often it evaluates and
saves, where it runs) are taken from the command line, and the changed ones are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config
from ..errors import ConfigError, RunError
from .folder import run_data_dir, run_preset

RESUMABLE = frozenset({
    # how long and how fast: the cosine schedule stretches to the new max_steps
    "max_steps", "time_budget_minutes", "time_budget_clock", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
    "grad_clip", "skip_nonfinite_steps",
    # evaluation and checkpoints
    "eval_every", "eval_loops", "eval_windows", "eval_samples", "eval_examples", "test_difficulties",
    "checkpoint_every", "cfg_scale",
    # where and how it runs (grad_accum: the trainer checks the micro-batches per step stay the same)
    "device", "bf16", "compile", "checkpointing", "attention", "collective_timeout_minutes", "data_parallel",
    "grad_accum",
})
DATA_GIVEN = frozenset({"vocab_size", "image_size", "channels", "num_classes"})  # filled in from the data folder
NAMED_AT_MOST = 6  # differing keys a refusal lists by name


def resume_changes(run_dir, saved: Config, given: Config, data_dir: Path | None, step: int,
                   preset: str | None = None) -> list[str]:
    """The RESUMABLE settings the command line changes, as 'key old -> new'; ConfigError in one line
    if it changes the model or the data (another ``preset`` than the run's, a model key, another
    --data) or asks for fewer steps than the run has trained (``step``)."""
    recorded = _recorded(run_dir, run_preset)
    if preset is not None and recorded not in (None, False, preset):
        raise ConfigError(f"--resume: {run_dir} was trained from --preset {recorded}, not {preset}; resume it with "
                          f"--preset {recorded} (and its overrides), or train a new run with another --out")
    changed, refused = [], []
    for key, ours, theirs in _differences(saved, given):
        (changed if key in RESUMABLE else refused).append(f"{key} {_show(ours)} -> {_show(theirs)}")
    if refused:
        more = f" and {len(refused) - NAMED_AT_MOST} more" if len(refused) > NAMED_AT_MOST else ""
        raise ConfigError(f"--resume: the command line would change the model or the data of {run_dir}: "
                          f"{', '.join(refused[:NAMED_AT_MOST])}{more} (run -> command line); a resume keeps them: "
                          "give the run's own --preset and overrides, or train a new run with another --out")
    recorded = _recorded(run_dir, run_data_dir)
    given_data = None if data_dir is None else Path(data_dir).resolve()
    if recorded is not False and recorded != given_data:
        raise ConfigError(f"--resume: {run_dir} was trained on --data {recorded}, not {given_data}; "
                          f"resume it with --data {recorded}")
    budget = given.train.time_budget_minutes > 0  # max_steps is then estimated from the step time
    if not budget and given.train.max_steps < step:
        raise ConfigError(f"--resume: max_steps={given.train.max_steps} is below step {step}, where the run "
                          "resumes; give a larger --max_steps")
    return [change for change in changed if not (budget and change.startswith("max_steps "))]


def _differences(saved: Config, given: Config):
    """(key, saved value, given value) for every key that differs, the data-given ones aside."""
    for name in ("model", "diffusion", "train"):
        ours, theirs = getattr(saved, name), getattr(given, name)
        for field in dataclasses.fields(ours):
            a, b = getattr(ours, field.name), getattr(theirs, field.name)
            if field.name not in DATA_GIVEN and a != b:
                yield field.name, a, b


def _recorded(run_dir, read):
    """What data.json records (``read``: run_data_dir or run_preset); False if the run has no data.json."""
    try:
        return read(run_dir)
    except RunError:
        return False


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
