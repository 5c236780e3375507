"""Loaders and metrics of loopdb's Shakespeare tasks (data made by eval/make_tasks.py).

Every data file is found next to THIS file, so the tasks work from any working
directory and from any copy of the folder passed to --include-path; nothing touches
the Hugging Face hub (the rows become an in-memory ``datasets.Dataset``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_file: str, **metadata):
    """custom_dataset of the YAMLs: {"test": rows of data_file}. ``metadata`` (model args and
    the task's metadata, passed by lm-eval) is ignored."""
    import datasets

    with open(HERE / data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def words(text: str) -> list[str]:
    """Lower-case words (letters and apostrophes), punctuation dropped."""
    return re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())


def word_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two strings (SQuAD-style); 1.0 when both have no words."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    remaining = {}
    for word in ref:
        remaining[word] = remaining.get(word, 0) + 1
    common = 0
    for word in pred:
        if remaining.get(word, 0) > 0:
            remaining[word] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_continue(doc: dict, results: list[str]) -> dict:
    """word_f1: bag-of-words F1 of the generated rest of the line against the true one;
    next_word: 1 if the first generated word is the true next word."""
    generated = results[0]
    pred, ref = words(generated), words(doc["target"])
    return {
        "word_f1": word_f1(generated, doc["target"]),
        "next_word": float(bool(pred) and bool(ref) and pred[0] == ref[0]),
    }
