"""The command line's own values (loop lists, --key=value overrides, budgets, flag minimums)."""

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


def add_budget_arguments(parser, member: str) -> None:
    """compare / study: the training budget of each trained run (``member`` names it in the help)."""
    parser.add_argument("--budget-minutes", type=float, default=None, help=f"training time per {member}")
    parser.add_argument("--steps", type=int, default=None, help=f"train each {member} for this many steps instead")


def check_budget(args) -> None:
    """compare / study: exactly one of --budget-minutes M > 0 or --steps N >= 1."""
    if (args.budget_minutes is None) == (args.steps is None):
        raise UsageError("give exactly one of --budget-minutes M (equal time) or --steps N (equal steps)")
    if (args.budget_minutes is not None and args.budget_minutes <= 0) or (args.steps is not None and args.steps < 1):
        raise UsageError("--budget-minutes must be > 0 and --steps >= 1")
