"""Deterministic reasoning tasks where depth matters, and their word-level tokenizer.

Every task writes its inputs as words from a fixed vocabulary. Text convention (all tasks):
every word token carries its LEADING space and "\\n" is a token of its own, so a text is
``"".join(" " + word for word in words)`` (e.g. ``" 021 102 210"``), each word token is
``len(word) + 1`` UTF-8 bytes, "\\n" is 1 byte, and ``decode(encode(text)) == text`` for every
text a task produces.

Tasks (registry keys in ``TASKS``), difficulty = how many sequential steps the answer needs:

- ``s3``, ``s5``: the word problem of the symmetric group S_m. An element is the word of its
  images, ``"120"`` = the permutation 0->1, 1->2, 2->0. The prompt is n random elements
  g_1 .. g_n (difficulty n); the answer at element i is the prefix product
  P_i = g_i o ... o g_1 (apply g_1 first: P_i[x] = g_i[P_{i-1}[x]]), supervised at EVERY
  element's position. State tracking in S_5 is not solvable by a fixed-depth circuit
  family of bounded size (NC1-complete), so each element needs its own step.
- ``hops``: a random cyclic permutation f of k symbols (default 8: a..h; one cycle through all
  of them) listed as shuffled pair tokens ``"a>c"`` (one token per pair: f(a) = c), then a
  start symbol s, then h hop markers ``">"`` (difficulty h). The answer at the i-th marker is
  f^i(s); no intermediate symbol is in the input, so marker i needs i lookups (until the
  cycle wraps: f^k(s) = s, so at h = k, 2k, ... the start symbol is the answer).
- ``addition``: two n-digit numbers, digits least-significant first, ``" 3 2 1 + 5 4 0 ="``
  (= 123 + 45); the answers are the n+1 digits of the sum, least-significant first
  (``8 6 1 0``), teacher-forced, then "\\n".

Training layout (``training_arrays``): the model at position t has read inputs[:t+1] and must
predict targets[t]. For s3/s5/hops the target is NOT the next input token: the answer is
written nowhere in the input, the model emits it at the position where it becomes known.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from loopdb.errors import DataError, UsageError
from loopdb.names import IGNORE_INDEX

NEWLINE = "\n"


# ---------------------------------------------------------------------------
# Tokenizer


def join_words(words) -> str:
    """The text of a sequence of words under the leading-space convention ("\\n" stays bare)."""
    return "".join(word if word == NEWLINE else " " + word for word in words)


def split_words(text: str) -> list[str]:
    """Words of a text: "\\n" is a word, spaces separate words (a missing leading space is tolerated)."""
    words: list[str] = []
    for index, line in enumerate(text.split(NEWLINE)):
        if index:
            words.append(NEWLINE)
        words.extend(word for word in line.split(" ") if word)
    return words


class SymbolTokenizer:
    """One id per word of a fixed vocabulary; id 0 is "\\n". Same interface as loopdb's other
    tokenizers (vocab_size, newline_id, token_bytes, encode, decode, piece, to_bytes, from_bytes)."""

    def __init__(self, words):
        words = list(words)
        if NEWLINE in words:
            words.remove(NEWLINE)
        words = [NEWLINE] + words
        if len(set(words)) != len(words) or any(not w or " " in w or NEWLINE in w for w in words[1:]):
            raise DataError("a symbol tokenizer needs distinct, non-empty words without spaces or newlines; fix the word list")
        self.words = words
        self._ids = {word: index for index, word in enumerate(words)}
        self.vocab_size = len(words)
        self.newline_id = 0
        # each word token decodes to " " + word; "\n" to itself
        self.token_bytes = np.array([1] + [len(word.encode("utf-8")) + 1 for word in words[1:]], dtype=np.int64)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SymbolTokenizer":
        """The tokenizer of ``to_bytes``'s output."""
        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError("tokenizer data is not JSON; write it with SymbolTokenizer.to_bytes") from None
        if not isinstance(spec, dict) or spec.get("kind") != "symbols" or not isinstance(spec.get("words"), list):
            raise DataError('tokenizer data is not a symbol tokenizer (needs {"kind": "symbols", "words": [...]}); write it with SymbolTokenizer.to_bytes')
        return cls(spec["words"])

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": "symbols", "words": self.words}).encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of a text; decode(encode(text)) == text for texts in the leading-space convention."""
        ids = []
        for word in split_words(text):
            if word not in self._ids:
                raise DataError(f"word {word!r} is not in this task's vocabulary; use the task's own tokenizer")
            ids.append(self._ids[word])
        return ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return join_words(self.words[i] for i in ids)

    def piece(self, token_id: int) -> str:
        return self.words[int(token_id)]


# ---------------------------------------------------------------------------
# Tasks


@dataclass
class Example:
    prompt: str  # everything the model reads, e.g. " 021 102 210"
    answers: list[str]  # supervised answer words in order (one per element / marker / sum digit)
    difficulty: int


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name}={value!r} is invalid; pass an integer >= {minimum}")
    return int(value)


class Task:
    """A family of examples indexed by (seed, difficulty, index). Subclasses define the
    vocabulary, the sampler, the direct solver and the training layout."""

    name = "task"
    description = ""
    min_difficulty = 1

    def vocabulary(self) -> list[str]:
        """Every word the task can produce at ANY difficulty ("\\n" is added by the tokenizer)."""
        raise NotImplementedError

    def sample(self, rng: random.Random, difficulty: int) -> Example:
        raise NotImplementedError

    def solve(self, example: Example) -> list[str]:
        """Every answer recomputed from the prompt text alone (not from the sampler's bookkeeping)."""
        raise NotImplementedError

    def training_sequence(self, example: Example) -> tuple[str, list[str | None]]:
        """(input text, target word per input token or None): targets[t] is answered after reading tokens[:t+1]."""
        raise NotImplementedError

    def answer_openers(self) -> list[str]:
        """The words that end the prompt: a sequence asks its first answer at the first of them, and
        asks none before it (the newline never opens: a start token stays in the prompt)."""
        raise NotImplementedError

    def opener_ids(self) -> list[int]:
        """Token ids of ``answer_openers``."""
        return [self.tokenizer().encode(word)[0] for word in self.answer_openers()]

    def shortcut_guesses(self, example: Example) -> dict[str, str]:
        """Final answers of shallow shortcuts (name -> guessed answer text)."""
        return {}

    def chance(self, example: Example) -> float:
        """Probability that a uniform guess of the final answer is right."""
        raise NotImplementedError

    def final_answer(self, example: Example) -> str:
        """The text lm-eval compares with the generation (answers[-1]; addition: all digits)."""
        return example.answers[-1]

    def answer_tokens(self, difficulty: int) -> int:
        """How many tokens generation needs after the prompt (max_gen_toks)."""
        return 1

    # -- shared machinery

    def tokenizer(self) -> SymbolTokenizer:
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = SymbolTokenizer(self.vocabulary())
        return self._tokenizer

    def example_rng(self, seed: int, difficulty: int, index: int) -> random.Random:
        """A generator that depends only on (task, seed, difficulty, index), stable across processes."""
        key = f"loopdb.tasks/{self.name}/{seed}/{difficulty}/{index}".encode()
        return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def generate(self, seed: int, difficulty: int, count: int) -> list[Example]:
        seed = _check_int("seed", seed, 0)
        difficulty = _check_int("difficulty", difficulty, self.min_difficulty)
        count = _check_int("count", count, 1)
        return [self.sample(self.example_rng(seed, difficulty, index), difficulty) for index in range(count)]

    def baselines(self, examples: list[Example]) -> dict[str, float]:
        """Final-answer accuracy of shortcuts: majority (the set's most common answer, so slightly
        optimistic), the task's own shortcuts, and chance (uniform guessing, expected)."""
        if not examples:
            raise UsageError("baselines need at least one example; pass a non-empty list")
        truths = [self.final_answer(example) for example in examples]
        result = {"majority": Counter(truths).most_common(1)[0][1] / len(truths)}
        guesses = [self.shortcut_guesses(example) for example in examples]
        for key in guesses[0]:
            result[key] = sum(guess[key] == truth for guess, truth in zip(guesses, truths)) / len(truths)
        result["chance"] = sum(self.chance(example) for example in examples) / len(examples)
        return result


class GroupWordTask(Task):
    """Prefix products in S_m (see the module docstring)."""

    def __init__(self, degree: int):
        if not 2 <= degree <= 7:
            raise UsageError(f"symmetric group degree {degree} is unsupported; use 2..7")
        self.degree = degree
        self.name = f"s{degree}"
        self.description = f"prefix products of n random S_{degree} elements (difficulty n), answer at every element"
        self.elements = ["".join(map(str, perm)) for perm in itertools.permutations(range(degree))]
        index = {word: i for i, word in enumerate(self.elements)}
        perms = list(itertools.permutations(range(degree)))
        # the sampler's bookkeeping: a Cayley table, after[a][b] = index of (b o a)
        self.after = [[index["".join(str(b[a[x]]) for x in range(degree))] for b in perms] for a in perms]

    def vocabulary(self) -> list[str]:
        return list(self.elements)

    def answer_openers(self):
        return list(self.elements)  # every element is answered

    def sample(self, rng, difficulty):
        picks = [rng.randrange(len(self.elements)) for _ in range(difficulty)]
        state, answers = picks[0], [self.elements[picks[0]]]
        for pick in picks[1:]:
            state = self.after[state][pick]
            answers.append(self.elements[state])
        return Example(join_words(self.elements[p] for p in picks), answers, difficulty)

    def solve(self, example):
        words = split_words(example.prompt)
        for word in words:
            if sorted(word) != [str(x) for x in range(self.degree)]:
                raise DataError(f"{word!r} is not an element of S_{self.degree}; write permutations as their images, e.g. {self.elements[-1]}")
        # follow every point through the elements, one element at a time
        points, answers = list(range(self.degree)), []
        for word in words:
            points = [int(word[p]) for p in points]
            answers.append("".join(map(str, points)))
        return answers

    def training_sequence(self, example):
        return example.prompt, list(example.answers)

    def shortcut_guesses(self, example):
        return {"last_symbol": split_words(example.prompt)[-1]}

    def chance(self, example):
        return 1 / len(self.elements)


class HopsTask(Task):
    """Following a permutation for h hops (see the module docstring)."""

    name = "hops"
    marker = ">"

    def __init__(self, symbols: int = 8):
        if not 2 <= symbols <= 26:
            raise UsageError(f"hops with {symbols} symbols is unsupported; use 2..26")
        self.symbols = list(string.ascii_lowercase[:symbols])
        self.description = f"f^i(start) at the i-th '>' for a listed {symbols}-cycle on {symbols} symbols (difficulty = hops)"

    def vocabulary(self):
        pairs = [f"{x}>{y}" for x in self.symbols for y in self.symbols]
        return pairs + self.symbols + [self.marker]

    def sample(self, rng, difficulty):
        # one cycle through all k symbols: f^i(s) != s for 0 < i < k, so no hop count below k
        # can be answered by copying the start (a uniform permutation's short cycles allow that)
        cycle = list(self.symbols)
        rng.shuffle(cycle)
        f = {cycle[j]: cycle[(j + 1) % len(cycle)] for j in range(len(cycle))}
        listed = list(self.symbols)
        rng.shuffle(listed)
        offset = rng.randrange(len(cycle))
        start = cycle[offset]
        # the sampler's bookkeeping: f^i(start) = cycle[(offset + i) mod k]
        answers = [cycle[(offset + i) % len(cycle)] for i in range(1, difficulty + 1)]
        words = [f"{x}>{f[x]}" for x in listed] + [start] + [self.marker] * difficulty
        return Example(join_words(words), answers, difficulty)

    def _parse(self, prompt: str):
        words = split_words(prompt)
        k = len(self.symbols)
        pairs, start, markers = words[:k], words[k:k + 1], words[k + 1:]
        f = {}
        for pair in pairs:
            source, _, target = pair.partition(">")
            if source not in self.symbols or target not in self.symbols or source in f:
                raise DataError(f"bad pair {pair!r} in a hops prompt; expected {k} pairs like a>c with distinct sources")
            f[source] = target
        if len(start) != 1 or start[0] not in self.symbols or any(m != self.marker for m in markers):
            raise DataError("a hops prompt is the pairs, one start symbol, then '>' markers; regenerate it with the hops task")
        return f, start[0], len(markers)

    def solve(self, example):
        f, symbol, hops = self._parse(example.prompt)
        answers = []
        for _ in range(hops):
            symbol = f[symbol]
            answers.append(symbol)
        return answers

    def training_sequence(self, example):
        return example.prompt, [None] * (len(self.symbols) + 1) + list(example.answers)

    def answer_openers(self):
        return [self.marker]

    def shortcut_guesses(self, example):
        f, start, _ = self._parse(example.prompt)
        return {"start_symbol": start, "one_hop": f[start]}

    def chance(self, example):
        return 1 / len(self.symbols)


class AdditionTask(Task):
    """n-digit addition, digits least-significant first (see the module docstring)."""

    name = "addition"
    description = "a + b for two n-digit numbers, digits least-significant first (difficulty n), sum digits teacher-forced"

    def vocabulary(self):
        return list(string.digits) + ["+", "="]

    def sample(self, rng, difficulty):
        a = [rng.randrange(10) for _ in range(difficulty)]
        b = [rng.randrange(10) for _ in range(difficulty)]
        # the sampler's bookkeeping: schoolbook carries, least-significant digit first
        carry, answers = 0, []
        for x, y in zip(a, b):
            carry, digit = divmod(x + y + carry, 10)
            answers.append(str(digit))
        answers.append(str(carry))
        words = [str(x) for x in a] + ["+"] + [str(y) for y in b] + ["="]
        return Example(join_words(words), answers, difficulty)

    def _operands(self, prompt: str) -> tuple[list[str], list[str]]:
        words = split_words(prompt)
        if words.count("+") != 1 or words[-1:] != ["="]:
            raise DataError("an addition prompt is 'digits + digits =' (least-significant first); regenerate it with the addition task")
        plus = words.index("+")
        a, b = words[:plus], words[plus + 1:-1]
        if not a or len(a) != len(b) or not all(w in string.digits for w in a + b):
            raise DataError("an addition prompt needs two operands of the same number of digits; regenerate it with the addition task")
        return a, b

    def solve(self, example):
        a, b = self._operands(example.prompt)
        total = int("".join(reversed(a))) + int("".join(reversed(b)))
        return list(reversed(str(total).zfill(len(a) + 1)))

    def training_sequence(self, example):
        prompt_tokens = len(split_words(example.prompt))
        text = example.prompt + join_words(example.answers)
        # "=" predicts the first digit, each digit the next one, the last digit "\n" (so generation stops)
        return text, [None] * (prompt_tokens - 1) + list(example.answers) + [NEWLINE]

    def answer_openers(self):
        return ["="]  # "=" predicts the first sum digit

    def final_answer(self, example):
        return " ".join(example.answers)

    def answer_tokens(self, difficulty):
        return difficulty + 2  # n+1 digits and the newline

    def shortcut_guesses(self, example):
        a, b = self._operands(example.prompt)
        no_carry = [str((int(x) + int(y)) % 10) for x, y in zip(a, b)] + ["0"]
        return {"no_carry": " ".join(no_carry)}

    def chance(self, example):
        return 1 / (10 ** example.difficulty * 2)  # the top digit is 0 or 1


TASKS: dict[str, Task] = {task.name: task for task in (GroupWordTask(3), GroupWordTask(5), HopsTask(), AdditionTask())}


def get_task(name) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------
# Training and evaluation layout


def training_arrays(task, examples: list[Example], length: int | None = None,
                    start_token: bool = False) -> tuple["torch.LongTensor", "torch.LongTensor"]:
    """(inputs, targets), each (N, length). inputs: each example's token ids (s3/s5/hops: the
    prompt; addition: prompt + answer digits), right-padded with newline_id. targets[n, t]: the
    answer the model must give after reading inputs[n, :t+1], IGNORE_INDEX (-100) elsewhere.
    ``length=None`` uses the longest example. ``start_token``: a newline (unscored) opens every row."""
    import torch  # here, so the CLI and the generators start without it

    task = get_task(task)
    if not examples:
        raise UsageError("training_arrays needs at least one example; pass a non-empty list")
    tokenizer = task.tokenizer()
    rows = []
    for example in examples:
        text, targets = task.training_sequence(example)
        ids = tokenizer.encode(text)
        assert len(ids) == len(targets), "a task's training_sequence must give one target per token"
        answer_ids = [IGNORE_INDEX if t is None else tokenizer.encode(t)[0] for t in targets]
        rows.append(([tokenizer.newline_id, *ids], [IGNORE_INDEX, *answer_ids]) if start_token else (ids, answer_ids))
    longest = max(len(ids) for ids, _ in rows)
    length = longest if length is None else _check_int("length", length, 1)
    if longest > length:
        raise DataError(f"an example needs {longest} positions but length={length}; pass length >= {longest}")
    inputs = torch.full((len(rows), length), tokenizer.newline_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, answer_ids) in enumerate(rows):
        inputs[row, :len(ids)] = torch.tensor(ids)
        targets[row, :len(ids)] = torch.tensor(answer_ids)
    return inputs, targets


def final_answer_positions(task, examples: list[Example], start_token: bool = False) -> list[list[int]]:
    """Per example, the positions of training_arrays (with the same ``start_token``) whose targets
    spell the final answer: the last prompt position for s3/s5/hops (one token generated after the
    prompt is answers[-1]); for addition, the "=" position and every answer digit but the last (the
    newline target excluded)."""
    task = get_task(task)
    positions = []
    for example in examples:
        prompt_tokens = len(split_words(example.prompt)) + int(start_token)
        answer_tokens = len(task.final_answer(example).split(" "))
        positions.append(list(range(prompt_tokens - 1, prompt_tokens - 1 + answer_tokens)))
    return positions


def parse_difficulties(text: str) -> list[int]:
    """"8" -> [8]; "3-12" -> [3..12]; "4,8,16" -> [4, 8, 16]; parts combine ("2-4,8")."""
    difficulties: list[int] = []
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise UsageError(f"difficulties {text!r} are unreadable; write e.g. 8, 3-12 or 4,8,16") from None
        if first < 1 or last < first:
            raise UsageError(f"difficulties {text!r}: need 1 <= A <= B in A-B; write e.g. 3-12")
        difficulties.extend(range(first, last + 1))
    if len(set(difficulties)) != len(difficulties):
        raise UsageError(f"difficulties {text!r} repeat a value; list each difficulty once")
    return difficulties
