"""Deterministic reasoning tasks where depth matters (s3, s5, hops, addition), their word-level
tokenizer, training arrays with an answer at every step, and lm-eval task folders.

    from loopdb.tasks import get_task, training_arrays
    task = get_task("s3")
    examples = task.generate(seed=0, difficulty=12, count=256)
    inputs, targets = training_arrays(task, examples, length=24)  # model at t predicts targets[t]

``python -m loopdb.tasks TASK --seed S --difficulties A-B --count N --out DIR`` writes an
lm-eval folder. Formats and conventions: see ``loopdb/tasks/generators.py``.
"""

from .generators import (
    IGNORE_INDEX,
    TASKS,
    AdditionTask,
    Example,
    GroupWordTask,
    HopsTask,
    SymbolTokenizer,
    Task,
    final_answer_positions,
    get_task,
    parse_difficulties,
    training_arrays,
)
from .lm_eval_folder import write_task_folder

__all__ = [
    "IGNORE_INDEX", "TASKS", "AdditionTask", "Example", "GroupWordTask", "HopsTask", "SymbolTokenizer", "Task",
    "final_answer_positions", "get_task", "parse_difficulties", "training_arrays", "write_task_folder",
]
