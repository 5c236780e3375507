"""Build the data of loopdb's local lm-eval tasks from the held-out TEST play (Macbeth).

    python eval/make_tasks.py            # (re)write eval/tasks/shakespeare/*.jsonl
    python eval/make_tasks.py --check    # exit 1 if the committed files differ from a fresh build

The text is the test split of the default corpus exactly as `loopdb prepare` reads it
(``loopdb.data.corpus.default_corpus_files()`` filtered by ``loopdb.data.corpus.TEST_DOCUMENTS``), so no
line of it was seen in training. Everything is deterministic (fixed seeds, no set or dict
iteration order involved), so the files can be rebuilt and compared byte for byte.

- bpb.jsonl:      the whole play cut into passages at blank lines (about 1500+ characters
                  each); the passages concatenate back to the exact test split.
- cloze.jsonl:    the 8 lines before a verse line (context), the true line and three verse
                  lines from at least 40 lines away (choices, shuffled), the index of the truth.
- continue.jsonl: 8 lines of context plus the first half of a verse line; the target is the
                  rest of that line (the model generates until the newline).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks" / "shakespeare"
PASSAGE_CHARS = 1500
CLOZE_ITEMS = 200
CONTINUE_ITEMS = 200
CONTEXT_LINES = 8
MIN_LINE_CHARS = 25
DISTRACTOR_DISTANCE = 40
SEED = 1234
SPEAKER = re.compile(r"[A-Z][A-Z ,'\-]*\.")


def test_play_text() -> str:
    """The test split's text, exactly as `loopdb prepare` builds it (UTF-8, newline-terminated documents)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    from loopdb.data.corpus import TEST_DOCUMENTS, default_corpus_files

    files = {path.stem: path for path in default_corpus_files()}
    texts = []
    for name in sorted(TEST_DOCUMENTS):
        text = files[name].read_bytes().decode("utf-8")
        texts.append(text if text.endswith("\n") else text + "\n")
    return "".join(texts)


def passages(text: str) -> list[str]:
    """Blank-line-separated blocks glued into passages of at least PASSAGE_CHARS characters."""
    blocks = re.split(r"(?<=\n\n)(?=[^\n])", text)  # each block keeps its trailing blank lines
    out, pending = [], ""
    for block in blocks:
        pending += block
        if len(pending) >= PASSAGE_CHARS:
            out.append(pending)
            pending = ""
    if pending:
        if out:
            out[-1] += pending
        else:
            out.append(pending)
    assert "".join(out) == text
    return out


def verse_lines(lines: list[str]) -> list[int]:
    """Indices of spoken lines: inside a block that starts with a speaker name, after ACT I."""
    start = next(i for i, line in enumerate(lines) if line.strip() == "ACT I.")
    picked, in_speech = [], False
    for index in range(start, len(lines)):
        line = lines[index].strip()
        if not line:
            in_speech = False
        elif SPEAKER.fullmatch(line) and not line.startswith(("ACT", "SCENE")):
            in_speech = True
        elif in_speech and "[" not in line and "]" not in line and len(line) >= MIN_LINE_CHARS:
            picked.append(index)
    return picked


def context_before(lines: list[str], index: int) -> str:
    return "\n".join(lines[max(0, index - CONTEXT_LINES):index]) + "\n"


def cloze_items(lines: list[str], candidates: list[int]) -> list[dict]:
    rng = random.Random(SEED)
    targets = sorted(rng.sample(candidates, CLOZE_ITEMS))
    items = []
    for index in targets:
        pool = [i for i in candidates if abs(i - index) >= DISTRACTOR_DISTANCE and lines[i] != lines[index]]
        distractors = [lines[i] for i in rng.sample(pool, 3)]
        choices = [lines[index]] + distractors
        order = list(range(4))
        rng.shuffle(order)
        items.append({"line": index + 1, "context": context_before(lines, index),
                      "choices": [choices[k] for k in order], "gold": order.index(0)})
    return items


def continue_items(lines: list[str], candidates: list[int]) -> list[dict]:
    rng = random.Random(SEED + 1)
    eligible = [i for i in candidates if len(lines[i].split()) >= 6]
    items = []
    for index in sorted(rng.sample(eligible, CONTINUE_ITEMS)):
        words = lines[index].split(" ")
        cut = len(words) // 2
        head, rest = " ".join(words[:cut]), " " + " ".join(words[cut:])
        items.append({"line": index + 1, "context": context_before(lines, index) + head, "target": rest})
    return items


def build() -> dict[str, str]:
    text = test_play_text()
    lines = text.split("\n")
    candidates = verse_lines(lines)
    files = {
        "bpb.jsonl": [{"passage": i, "text": passage} for i, passage in enumerate(passages(text))],
        "cloze.jsonl": cloze_items(lines, candidates),
        "continue.jsonl": continue_items(lines, candidates),
    }
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for name, rows in files.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    parser.add_argument("--out", default=str(TASK_DIR), help="task folder (default: eval/tasks/shakespeare)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    built = build()
    if args.check:
        stale = [name for name, content in built.items()
                 if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != content]
        if stale:
            print(f"out of date: {', '.join(stale)}; rerun python eval/make_tasks.py", file=sys.stderr)
            return 1
        print("task data is up to date")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, content in built.items():
        (out / name).write_text(content, encoding="utf-8")
        print(f"wrote {out / name}: {content.count(chr(10))} rows, {len(content.encode('utf-8')):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
