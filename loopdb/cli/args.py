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
