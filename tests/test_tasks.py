"""loopdb.tasks: deterministic generators, direct solvers, tokenizer, training layout, lm-eval folders, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopdb.errors import DataError, UsageError
from loopdb.tasks import (
    IGNORE_INDEX,
    TASKS,
    Example,
    SymbolTokenizer,
    final_answer_positions,
    get_task,
    parse_difficulties,
    training_arrays,
    write_task_folder,
)
from loopdb.tasks import __main__ as tasks_cli
from loopdb.tasks.generators import split_words

DIFFICULTIES = {"s3": range(1, 25), "s5": range(1, 13), "hops": range(1, 25), "addition": range(1, 13)}


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_per_seed_and_differ_across_seeds(name):
    task = get_task(name)
    first = task.generate(seed=7, difficulty=6, count=20)
    assert first == task.generate(seed=7, difficulty=6, count=20)
    assert task.generate(seed=7, difficulty=6, count=5) == first[:5]  # each example depends on its index only
    assert [e.prompt for e in task.generate(seed=8, difficulty=6, count=20)] != [e.prompt for e in first]
    assert all(e.difficulty == 6 for e in first)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_answer_equals_the_direct_solvers(name):
    task = get_task(name)
    for seed in range(5):
        for difficulty in DIFFICULTIES[name]:
            for example in task.generate(seed, difficulty, 4):
                assert task.solve(example) == example.answers


def test_answers_follow_the_documented_conventions():
    s3 = get_task("s3")
    # apply 120 first (0->1, 1->2, 2->0), then 021 (swap 1 and 2): 0->1->2, 1->2->1, 2->0->0
    assert s3.solve(Example(" 120 021", [], 2)) == ["120", "210"]
    hops = get_task("hops")
    assert hops.solve(Example(" a>b b>c c>d d>e e>f f>g g>h h>a c > > >", [], 3)) == ["d", "e", "f"]
    addition = get_task("addition")
    assert addition.solve(Example(" 3 2 1 + 5 4 0 =", [], 3)) == ["8", "6", "1", "0"]  # 123 + 45 = 168
    assert addition.solve(Example(" 9 9 + 1 0 =", [], 2)) == ["0", "0", "1"]  # 99 + 1 = 100


def test_hops_answers_never_revisit_the_start_before_the_cycle_wraps():
    hops = get_task("hops")
    for example in hops.generate(0, 16, 20):
        start = split_words(example.prompt)[8]
        assert [i + 1 for i, a in enumerate(example.answers) if a == start] == [8, 16]


@pytest.mark.parametrize("name", list(TASKS))
def test_tokenizer_round_trips_and_token_bytes_sum_to_utf8_bytes(name):
    task = get_task(name)
    tokenizer = task.tokenizer()
    assert tokenizer.piece(tokenizer.newline_id) == "\n" and tokenizer.vocab_size == len(tokenizer.token_bytes)
    for example in task.generate(3, 5, 10):
        text, _ = task.training_sequence(example)
        for sample in (example.prompt, text, example.prompt + "\n" + text):
            ids = tokenizer.encode(sample)
            assert tokenizer.decode(ids) == sample
            assert int(tokenizer.token_bytes[ids].sum()) == len(sample.encode("utf-8"))
        assert all(len(tokenizer.encode(" " + word)) == 1 for word in example.answers)
    again = SymbolTokenizer.from_bytes(tokenizer.to_bytes())
    assert again.words == tokenizer.words and (again.token_bytes == tokenizer.token_bytes).all()


def test_tokenizer_names_an_unknown_word_and_rejects_foreign_data():
    with pytest.raises(DataError, match="'xyz'"):
        get_task("s3").tokenizer().encode(" 012 xyz")
    with pytest.raises(DataError, match="symbol tokenizer"):
        SymbolTokenizer.from_bytes(b'{"kind": "char", "alphabet": "ab"}')


@pytest.mark.parametrize("name", list(TASKS))
def test_training_arrays_target_at_t_answers_what_inputs_up_to_t_show(name):
    task = get_task(name)
    tokenizer = task.tokenizer()
    examples = [e for d in (1, 3, 7) for e in task.generate(11, d, 6)]
    inputs, targets = training_arrays(task, examples, length=64)
    assert inputs.shape == targets.shape == (len(examples), 64)
    for row, example in enumerate(examples):
        supervised = 0
        for t in range(64):
            seen = tokenizer.decode(inputs[row, : t + 1])
            expected = _answer_after_reading(task, example, seen)
            assert targets[row, t].item() == (IGNORE_INDEX if expected is None else tokenizer.encode(expected)[0])
            supervised += expected is not None
        assert supervised == len(example.answers) + (name == "addition")  # addition also supervises the final "\n"
        prompt_ids = tokenizer.encode(example.prompt)
        assert inputs[row, : len(prompt_ids)].tolist() == prompt_ids
        assert (inputs[row, len(tokenizer.encode(task.training_sequence(example)[0])):] == tokenizer.newline_id).all()


def _answer_after_reading(task, example, seen):
    """What the model must say after reading the text ``seen`` (a prefix of the training input,
    possibly with padding), recomputed with the solver; None where nothing is supervised."""
    text, _ = task.training_sequence(example)
    words, full = split_words(seen), split_words(text)
    if len(words) > len(full):
        return None  # padding
    if task.name == "addition":
        prompt_len = len(split_words(example.prompt))
        if len(words) < prompt_len:
            return None
        answer = task.solve(example) + ["\n"]  # the solver reads the prompt only; the answer digits are teacher-forced
        return answer[len(words) - prompt_len]
    if task.name == "hops":
        if len(words) <= 9:
            return None  # pairs and the start symbol: nothing is asked yet
    return task.solve(Example(seen, [], 0))[-1]


def test_s3_target_is_not_the_next_input_token():
    task = get_task("s3")
    inputs, targets = training_arrays(task, task.generate(0, 12, 50), length=12)
    same = (targets[:, :-1] == inputs[:, 1:]).float().mean().item()
    assert same < 0.4  # a next-token layout would give 1.0; a random element matches 1/6 of the time


def test_final_answer_positions_point_at_the_final_answer():
    for name in TASKS:
        task = get_task(name)
        examples = task.generate(0, 5, 4)
        inputs, targets = training_arrays(task, examples)
        for row, (example, positions) in enumerate(zip(examples, final_answer_positions(task, examples))):
            assert task.tokenizer().decode(targets[row, positions]).split() == task.final_answer(example).split()
            if name != "addition":
                assert positions == [len(split_words(example.prompt)) - 1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_start_token_opens_every_row_and_shifts_the_answers_by_one(name):
    task = get_task(name)
    examples = task.generate(0, 5, 4)
    plain, opened = training_arrays(task, examples), training_arrays(task, examples, start_token=True)
    assert (opened[0][:, 0] == task.tokenizer().newline_id).all() and (opened[1][:, 0] == IGNORE_INDEX).all()
    assert opened[0][:, 1:].equal(plain[0]) and opened[1][:, 1:].equal(plain[1])
    shifted = final_answer_positions(task, examples, start_token=True)
    assert shifted == [[p + 1 for p in positions] for positions in final_answer_positions(task, examples)]


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("start_token", [False, True])
def test_the_prompt_ends_at_the_first_answer_opener_and_asks_no_answer(name, start_token):
    """The rule a model applies to bare tokens at inference (positions before the first opener) marks
    exactly the positions before the first answer of the training layout."""
    task = get_task(name)
    examples = [example for difficulty in (1, 3, 7) for example in task.generate(2, difficulty, 3)]
    inputs, targets = training_arrays(task, examples, start_token=start_token)
    opener = torch.zeros(len(task.tokenizer().words), dtype=torch.bool)
    opener[task.opener_ids()] = True
    prompt = opener[inputs].cumsum(1) == 0
    answered = targets != IGNORE_INDEX
    first = answered.float().argmax(1)
    assert torch.equal(prompt.sum(1), first) and not (prompt & answered).any()
    assert not opener[task.tokenizer().newline_id]


def test_without_a_start_token_the_first_two_positions_of_a_repeated_element_look_alike():
    """Why task runs can open with the newline: a causal prelude gives "a" and "a a" the same output
    (attention over equal tokens averages equal values), so position 1 cannot tell it is second."""
    from loopdb.config import preset
    from loopdb.families import build_model

    config = preset("depth-tiny")
    config.model.vocab_size = get_task("s3").tokenizer().vocab_size
    model = build_model(config).eval()
    with torch.no_grad():
        plain = model.encode(torch.tensor([[5, 5, 5]])).embedded[0]
        opened = model.encode(torch.tensor([[0, 5, 5, 5]])).embedded[0]
    assert torch.allclose(plain[0], plain[1], atol=1e-6) and torch.allclose(plain[1], plain[2], atol=1e-6)
    assert (opened[1] - opened[2]).abs().max() > 1e-3 and (opened[2] - opened[3]).abs().max() > 1e-3


def test_training_arrays_refuse_a_length_too_short():
    task = get_task("s3")
    with pytest.raises(DataError, match="length >= 9"):
        training_arrays(task, task.generate(0, 9, 2), length=8)


def test_parse_difficulties_reads_ranges_and_lists():
    assert parse_difficulties("3-6") == [3, 4, 5, 6]
    assert parse_difficulties("8") == [8]
    assert parse_difficulties("4,8,16") == [4, 8, 16]
    assert parse_difficulties("2-3,9") == [2, 3, 9]
    for bad in ("", "a-b", "5-3", "0", "2,2", "3-"):
        with pytest.raises(UsageError):
            parse_difficulties(bad)


def test_unknown_task_lists_the_choices():
    with pytest.raises(UsageError, match="s3, s5, hops"):
        get_task("s4")


def test_baselines_measure_the_shortcuts():
    hops = get_task("hops")
    assert hops.baselines(hops.generate(0, 8, 30))["start_symbol"] == 1.0  # an 8-cycle wraps at 8 hops
    assert hops.baselines(hops.generate(0, 5, 30))["start_symbol"] == 0.0
    s3 = get_task("s3")
    assert s3.baselines(s3.generate(0, 1, 30))["last_symbol"] == 1.0  # one element: its product is itself
    assert set(get_task("addition").baselines(get_task("addition").generate(0, 3, 10))) == {"majority", "no_carry", "chance"}


def test_task_folder_loads_in_lm_eval_and_scores_the_true_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "reasoning"
    yaml_path = write_task_folder("s3", 5, [2, 3], 4, folder)
    assert yaml_path == folder / "s3_seed5_d2-3.yaml"
    write_task_folder("addition", 5, [2], 3, folder, name="add_small")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert {"s3_seed5_d2-3", "add_small"} <= set(manager.all_tasks)
    tasks = manager.load(["s3_seed5_d2-3", "add_small"])["tasks"]
    s3_task, add_task = tasks["s3_seed5_d2-3"], tasks["add_small"]
    docs = list(s3_task.test_docs())
    expected = get_task("s3").generate(5, 2, 4) + get_task("s3").generate(5, 3, 4)
    assert [s3_task.doc_to_text(doc) for doc in docs] == [e.prompt for e in expected]
    assert [s3_task.doc_to_target(doc) for doc in docs] == [e.answers[-1] for e in expected]
    assert s3_task.config.generation_kwargs["max_gen_toks"] == 1
    assert add_task.config.generation_kwargs["max_gen_toks"] == 4
    # a generation with the tokenizer's leading space is right; the wrong element is not
    doc = docs[0]
    right = " " + doc["answer"]
    assert s3_task.process_results(doc, [right]) == {"exact_match": 1.0, "exact_match_d2": 1.0}
    assert s3_task.process_results(doc, [" 999"])["exact_match"] == 0.0
    add_doc = next(iter(add_task.test_docs()))
    assert add_task.process_results(add_doc, [" " + add_doc["answer"]])["exact_match"] == 1.0


def test_lm_eval_scores_a_solver_per_difficulty(tmp_path, monkeypatch):
    import lm_eval
    for key in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(key, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class SolverLM(LM):
        """Answers with the direct solver, the way a loopdb model's text comes out (leading spaces),
        except on prompts of difficulty 3, where it says something else."""

        def generate_until(self, requests, disable_tqdm=False):
            outputs = []
            for request in requests:
                prompt = request.args[0]
                task = get_task("addition" if "+" in prompt else "hops")
                answers = task.solve(Example(prompt, [], 0))
                text = " " + answers[-1] if task.name == "hops" else "".join(" " + a for a in answers) + "\n 7"
                outputs.append(" ?" if len(answers) == 3 + (task.name == "addition") else text)
            return outputs

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    folder = tmp_path / "reasoning"
    write_task_folder("hops", 1, [2, 3], 4, folder)
    write_task_folder("addition", 1, [2, 3], 4, folder)
    names = ["hops_seed1_d2-3", "addition_seed1_d2-3"]
    results = lm_eval.simple_evaluate(model=SolverLM(), tasks=names, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(folder), include_defaults=False))["results"]
    for name in names:
        assert results[name]["exact_match,none"] == 0.5
        assert results[name]["exact_match_d2,none"] == 1.0 and results[name]["exact_match_d3,none"] == 0.0


SHIPPED = Path(__file__).resolve().parent.parent / "eval" / "tasks" / "reasoning"


@pytest.mark.parametrize("name,difficulties", [("s3", "2-12"), ("s3", "13-24"), ("hops", "2-12"), ("hops", "13-24")])
def test_shipped_reasoning_tasks_are_a_fresh_build(tmp_path, name, difficulties):
    path = write_task_folder(name, 1000, parse_difficulties(difficulties), 50, tmp_path)
    for made in (path, path.with_suffix(".jsonl"), tmp_path / "utils.py"):
        assert made.read_bytes() == (SHIPPED / made.name).read_bytes(), f"rerun the commands in {SHIPPED}/README.md"


def _cli(*args, cwd):
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "loopdb.tasks", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(root), "PATH": ""})


@pytest.mark.parametrize("args", [
    ["s4", "--difficulties", "2-4", "--count", "3"],
    ["s3", "--difficulties", "4-2", "--count", "3"],
    ["s3", "--difficulties", "2-4", "--count", "0"],
    ["s3", "--difficulties", "2-4", "--count", "three"],
    ["s3", "--count", "3"],
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args):
    assert tasks_cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert not (tmp_path / "out").exists()


def test_cli_process_exit_code_is_2_for_an_unknown_task(tmp_path):
    result = _cli("s4", "--difficulties", "2-4", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "s3, s5, hops" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_folder_and_prints_baselines(tmp_path, capsys):
    out = tmp_path / "out"
    assert tasks_cli.main(["hops", "--seed", "3", "--difficulties", "2-4", "--count", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hops_seed3_d2-4.yaml" in printed and "start_symbol" in printed
    assert len((out / "hops_seed3_d2-4.jsonl").read_text().splitlines()) == 15 and (out / "utils.py").is_file()
    assert tasks_cli.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in TASKS)
