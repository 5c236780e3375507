"""Loader and metric of loopdb reasoning tasks (written by loopdb.tasks.lm_eval_folder).

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
    generated = results[0].split("\n")[0]
    correct = float(" ".join(generated.split()) == " ".join(doc["answer"].split()))
    return {"exact_match": correct, f"exact_match_d{doc['difficulty']}": correct}
