"""User-facing errors: the library raises these, and only the CLI turns them into one
line on stderr and exit code 2 (anything else is a bug and keeps its traceback)."""

from __future__ import annotations


class LoopdbError(ValueError):
    """A mistake the user can fix; the message names the problem and the fix."""


class ConfigError(LoopdbError):
    """A bad preset, config key or value, or an impossible combination of them."""


class DataError(LoopdbError):
    """A corpus, dataset folder or task file that cannot be used."""


class RunError(LoopdbError):
    """A run folder or checkpoint that is missing, unfinished or damaged."""


class TrainingError(LoopdbError):
    """A run that cannot go on: a non-finite loss or gradient norm, a process of the job lost."""


class UsageError(LoopdbError):
    """A bad command-line argument."""


class EvalError(LoopdbError):
    """A bad lm-eval request: unknown task, model argument or readout."""
