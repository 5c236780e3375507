"""Write a task's test set as an lm-eval task folder: NAME.yaml + NAME.jsonl + utils.py.

The folder follows eval/tasks/shakespeare: ``custom_dataset: !function utils.load`` reads
the rows from the data file next to utils.py (any working directory, any copy of the folder
passed to ``--include-path``, no hub). The model generates greedily after the prompt until
"\\n" (or max_gen_toks); ``exact_match`` compares the generation with the final answer,
whitespace-normalised, and ``exact_match_dN`` is the same over the rows of difficulty N
(lm-eval warns that these count fewer documents than ``exact_match``: that is intended).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loopdb.errors import DataError, UsageError

from .generators import get_task

UTILS_PY = '''"""Loader and metric of loopdb reasoning tasks (written by loopdb.tasks.lm_eval_folder).

The data file is found next to THIS file, so the tasks work from any working directory;
nothing touches the Hugging Face hub (the rows become an in-memory datasets.Dataset).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_file, **metadata):
    """custom_dataset of the YAMLs: {"test": rows of data_file}; ``metadata`` is ignored."""
    import datasets

    with open(HERE / data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc, results):
    """exact_match of the generation's first line, whitespace-normalised, overall and at the row's
    difficulty (only the first line: a model that does not stop at the newline gets no credit for more)."""
    generated = results[0].split("\\n")[0]
    correct = float(" ".join(generated.split()) == " ".join(doc["answer"].split()))
    return {"exact_match": correct, f"exact_match_d{doc['difficulty']}": correct}
'''

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")


def default_name(task_name: str, seed: int, difficulties: list[int]) -> str:
    return f"{task_name}_seed{seed}_d{min(difficulties)}-{max(difficulties)}"


def task_rows(task, seed: int, difficulties: list[int], count: int) -> tuple[list, list[dict]]:
    """(examples, JSONL rows) of every difficulty, ``count`` each."""
    task = get_task(task)
    examples = [example for difficulty in difficulties for example in task.generate(seed, difficulty, count)]
    rows = [{"prompt": ex.prompt, "answer": task.final_answer(ex), "difficulty": ex.difficulty, "seed": seed} for ex in examples]
    return examples, rows


def task_yaml(task, name: str, difficulties: list[int], count: int, seed: int) -> str:
    metrics = ["exact_match"] + [f"exact_match_d{d}" for d in difficulties]
    metric_lines = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return (
        f"# loopdb.tasks {task.name}: {task.description}.\n"
        f"# {count} examples per difficulty {min(difficulties)}..{max(difficulties)}, seed {seed}; written by\n"
        f"# python -m loopdb.tasks {task.name} --seed {seed} --difficulties {_spell(difficulties)} --count {count} --out DIR"
        f"{'' if name == default_name(task.name, seed, difficulties) else ' --name ' + name}\n"
        f"task: {name}\n"
        "custom_dataset: !function utils.load\n"
        "dataset_kwargs:\n"
        f"  data_file: {name}.jsonl\n"
        "output_type: generate_until\n"
        "test_split: test\n"
        "doc_to_text: prompt\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        "  until:\n"
        '    - "\\n"\n'
        f"  max_gen_toks: {max(task.answer_tokens(d) for d in difficulties)}\n"
        "  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n"
        f"{metric_lines}"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _spell(difficulties: list[int]) -> str:
    low, high = min(difficulties), max(difficulties)
    return f"{low}-{high}" if difficulties == list(range(low, high + 1)) else ",".join(map(str, difficulties))


def write_task_folder(task, seed: int, difficulties: list[int], count: int, out_dir, name: str | None = None) -> Path:
    """Write out_dir/NAME.yaml, out_dir/NAME.jsonl and out_dir/utils.py; returns the YAML's path.
    Everything is checked and generated before the first file is written."""
    task = get_task(task)
    difficulties = list(difficulties)
    if not difficulties:
        raise UsageError("no difficulties given; pass e.g. 2-12")
    name = name or default_name(task.name, seed, difficulties)
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"task name {name!r} has characters lm-eval cannot use; use letters, digits, _ . -")
    _, rows = task_rows(task, seed, difficulties, count)
    out_dir = Path(out_dir)
    utils_path = out_dir / "utils.py"
    if utils_path.exists() and utils_path.read_text(encoding="utf-8") != UTILS_PY:
        raise DataError(f"{utils_path} exists and is not loopdb's task utils.py; pass an --out folder of its own")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file; pass a folder to --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    utils_path.write_text(UTILS_PY, encoding="utf-8")
    yaml_path = out_dir / f"{name}.yaml"
    yaml_path.write_text(task_yaml(task, name, difficulties, count, seed), encoding="utf-8")
    return yaml_path
