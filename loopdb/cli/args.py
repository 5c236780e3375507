"""Parsing of the command line's own values (loop lists, --key=value overrides)."""

from __future__ import annotations

from ..errors import UsageError


def parse_loops(text: str) -> list[int]:
    try:
        loops = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--loops {text!r}: expected comma-separated integers like 1,4,16") from None
    if not loops or min(loops) < 1:
        raise UsageError(f"--loops {text!r}: every loop count must be >= 1")
    return loops


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise UsageError(f"unexpected argument {item!r}; config overrides look like --key=value")
        key, value = item[2:].split("=", 1)
        overrides[key.replace("-", "_")] = value
    return overrides


# the least value each numeric flag of `score` / `sample` takes, whatever the family
FLAG_MINIMUMS = {"samples": 1, "batch_size": 1, "max_windows": 1, "images_per_class": 1, "t_samples": 1,
                 "columns": 1, "max_new_tokens": 1, "temperature": 0, "top_k": 0}


def check_flag_minimums(args) -> None:
    """UsageError for a count below its least value (e.g. --top-k -5), before any model is loaded."""
    for name, minimum in FLAG_MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")
