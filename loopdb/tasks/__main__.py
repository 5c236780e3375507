"""python -m loopdb.tasks TASK --seed S --difficulties A-B --count N --out DIR [--name NAME]

Writes DIR/NAME.yaml + DIR/NAME.jsonl + DIR/utils.py (an lm-eval task folder) and prints one
line saying what it wrote, then the shortcut baselines. ``--list`` prints the tasks.
Bad input: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys

from loopdb.errors import LoopdbError, UsageError

from .generators import TASKS, get_task, parse_difficulties
from .lm_eval_folder import task_rows, write_task_folder


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block)."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m loopdb.tasks", description="Write an lm-eval folder of a reasoning task.")
    parser.add_argument("task", nargs="?", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--list", action="store_true", help="print the tasks and exit")
    parser.add_argument("--seed", type=int, default=1000, help="generation seed (default 1000; train on other seeds)")
    parser.add_argument("--difficulties", help="e.g. 8, 2-12 or 4,8,16")
    parser.add_argument("--count", type=int, default=50, help="examples per difficulty (default 50)")
    parser.add_argument("--out", help="folder to write")
    parser.add_argument("--name", help="lm-eval task name (default TASK_seedS_dA-B)")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.list:
            for task in TASKS.values():
                print(f"{task.name:10s} vocab {task.tokenizer().vocab_size:3d}  {task.description}")
            return 0
        if args.task is None or args.difficulties is None or args.out is None:
            raise UsageError("need TASK, --difficulties and --out; e.g. python -m loopdb.tasks s3 --difficulties 2-12 --out DIR")
        task = get_task(args.task)
        if args.count < 1:
            raise UsageError(f"--count {args.count} is invalid; pass at least 1 example per difficulty")
        difficulties = parse_difficulties(args.difficulties)
        if min(difficulties) < task.min_difficulty:
            raise UsageError(f"--difficulties must be >= {task.min_difficulty} for {task.name}")
        path = write_task_folder(task, args.seed, difficulties, args.count, args.out, name=args.name)
    except LoopdbError as error:
        print(f"python -m loopdb.tasks: error: {error}", file=sys.stderr)
        return 2
    examples, _ = task_rows(task, args.seed, difficulties, args.count)
    print(f"wrote {path} and {path.with_suffix('.jsonl').name} ({len(examples)} rows: {task.name}, seed {args.seed}, "
          f"difficulties {min(difficulties)}-{max(difficulties)}, {args.count} each) and utils.py")
    print("shortcut baselines (final-answer accuracy): "
          + ", ".join(f"{key} {value:.3f}" for key, value in task.baselines(examples).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
