"""loopdb as an lm-evaluation-harness model (loopdb.evaluation.lm_eval_model) and `loopdb eval`
(loopdb.evaluation.lm_eval_sweep).

Everything runs offline: the Hugging Face caches point into a temporary folder, the hub is
switched off, and every task is local (eval/tasks or a folder made here).
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_RUN, tiny_model

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "eval" / "tasks"
CONTEXT = 16  # tiny_model's window


@pytest.fixture(scope="module", autouse=True)
def offline_hf(tmp_path_factory):
    """HF caches in a temp folder and the hub off, set before lm_eval / datasets are first imported."""
    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"HF_HOME": home, "HF_DATASETS_CACHE": home / "datasets", "HF_HUB_OFFLINE": "1",
                           "HF_DATASETS_OFFLINE": "1", "HF_HUB_VERBOSITY": "error"}.items():
            patch.setenv(key, str(value))
        yield


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from loopdb.data.storage import load_tokenizer

    return load_tokenizer(data_dir)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from loopdb.evaluation.lm_eval_model import LoopDBLM

    return LoopDBLM(model=tiny_model(vocab_size=tokenizer.vocab_size), tokenizer=tokenizer, num_loops=2, samples=3,
                    seed=7, batch_size=4)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """A 2-step run folder made by `loopdb train`, as a user would."""
    from loopdb.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--quiet", *SMALL_RUN,
                 "--max_steps=2"])
    assert code == 0
    return run


def instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def play_text(data_dir, split="test", chars=3000) -> str:
    from loopdb.data.storage import load_tokenizer, load_tokens

    tokens = load_tokens(data_dir, split)
    return load_tokenizer(data_dir).decode(tokens[:2000])[:chars]


# -- the model class ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "ancestral"])
def test_batched_and_unbatched_loglikelihood_agree(tiny_lm, tokenizer, data_dir, solver):
    """Also for a sampler that draws along the way (ancestral steps), where rows must not share draws."""
    if solver != "euler":
        from loopdb.evaluation.lm_eval_model import LoopDBLM

        tiny_lm = LoopDBLM(model=tiny_model(vocab_size=tokenizer.vocab_size, solver=solver), tokenizer=tokenizer,
                           num_loops=2, samples=3, seed=7, batch_size=4)
    text = play_text(data_dir)
    pairs = [
        (text[:40], text[40:60]),            # fits in one window
        (text[:400], text[400:430]),         # context longer than the window: left-truncated
        (text[:30], text[30:200]),           # continuation longer than the window: several windows
        ("", "Fair is foul, and foul is fair"),  # empty context: conditioned on the newline prefix
        ("Ünïcødé ♥ ", "日本語 — naïve café"),   # byte-fallback pieces
        ("KING.\n", "\n"),
    ]
    requests = [instance("loglikelihood", pair) for pair in pairs]
    tiny_lm.batch_size = 4
    batched = tiny_lm.loglikelihood(requests, disable_tqdm=True)
    tiny_lm.batch_size = 1
    single = [tiny_lm.loglikelihood([request], disable_tqdm=True)[0] for request in requests]
    reversed_order = tiny_lm.loglikelihood(requests[::-1], disable_tqdm=True)[::-1]
    tiny_lm.batch_size = 4
    for (a, greedy_a), (b, greedy_b), (c, _) in zip(batched, single, reversed_order):
        assert math.isfinite(a) and a < 0
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)
        assert greedy_a == greedy_b
    # the same pair twice gives the same number (noise is seeded by the window's input tokens)
    assert tiny_lm.loglikelihood(requests[:1], disable_tqdm=True)[0][0] == pytest.approx(batched[0][0], abs=1e-6)


def test_is_greedy_and_left_truncation(tiny_lm):
    from loopdb.readouts import scoring as engine
    from loopdb.evaluation.lm_eval_model import window_seed

    context = list(range(10, 60))  # 50 tokens, longer than the 16-token window
    # the argmax continuation of the predictive distribution is greedy, another token is not
    inputs = context[-CONTEXT:]  # what the model reads for a one-token continuation; it seeds the noise
    generator = torch.Generator().manual_seed(window_seed(7, inputs))
    dist = engine.predictive_distribution(tiny_lm.model, torch.tensor([inputs]), 2, 3, [generator])[0, -1]
    best, worst = int(dist.argmax()), int(dist.argmin())
    (logp_best, greedy_best), (logp_worst, greedy_worst) = tiny_lm._loglikelihood_tokens(
        [(None, context, [best]), (None, context, [worst])], disable_tqdm=True)
    assert greedy_best and not greedy_worst and logp_best > logp_worst
    # left truncation: only the last T+1 tokens of context + continuation matter
    long = tiny_lm._loglikelihood_tokens([(None, context, [3, 4, 5])], disable_tqdm=True)[0]
    short = tiny_lm._loglikelihood_tokens([(None, context[-(CONTEXT + 1 - 3):], [3, 4, 5])], disable_tqdm=True)[0]
    assert long == short


def test_rolling_loglikelihood_is_the_sum_over_its_windows(tiny_lm, data_dir):
    from loopdb.readouts import scoring as engine
    from loopdb.evaluation.lm_eval_model import window_seed

    text = play_text(data_dir, chars=600)
    tokens = tiny_lm.tok_encode(text)
    assert len(tokens) > 3 * CONTEXT
    (rolling,) = tiny_lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    units = tiny_lm.rolling_windows(tokens)
    assert sum(count for _, count in units) == len(tokens)  # every token scored once
    scored = [token for window, count in units for token in window[-count:]]
    assert scored == tokens
    assert units[0][0][0] == tiny_lm.tok.newline_id  # the document starts after a newline
    total = 0.0
    for window, count in units:  # each window alone, straight through the engine
        generator = torch.Generator().manual_seed(window_seed(7, window[:-1]))
        logprobs = engine.predictive_logprobs(tiny_lm.model, torch.tensor([window]), 2, 3, generator)
        total += float(logprobs[0, -count:].double().sum())
    assert rolling == pytest.approx(total, abs=1e-4)


def test_generate_until_stops_at_the_stop_string(tiny_lm):
    ids, free = tiny_lm.generate_tokens("MACBETH.\n", until=[], max_gen_toks=40)
    assert len(ids) == 40 and tiny_lm.generate_tokens("MACBETH.\n", [], 21)[0] == ids[:21]  # chunking is invisible
    stop = next(free[i:i + 2] for i in range(3, len(free)) if free[i:i + 2].isascii() and free[i:i + 2].isalpha())
    (stopped,) = tiny_lm.generate_until(
        [instance("generate_until", ("MACBETH.\n", {"until": [stop], "max_gen_toks": 40}))], disable_tqdm=True)
    assert stopped == free[:free.find(stop)] and stop not in stopped
    (short,) = tiny_lm.generate_until([instance("generate_until", ("", {"until": ["\n\n"], "max_gen_toks": 3}))],
                                      disable_tqdm=True)  # empty context works
    assert isinstance(short, str) and len(tiny_lm.generate_tokens("", ["\n\n"], 3)[0]) <= 3
    (uni,) = tiny_lm.generate_until([instance("generate_until", ("Ünïcødé ♥ 日本", {"max_gen_toks": 5}))],
                                    disable_tqdm=True)
    assert isinstance(uni, str)


def test_batched_generate_until_equals_one_request_at_a_time(tiny_lm):
    """Five requests of unequal contexts, lengths and stop strings, in batches of 4 (and one
    sampled request in a group of its own): each answer is the one it gets alone."""
    requests = [("MACBETH.\n", {"until": ["\n\n"], "max_gen_toks": 9}), ("Thou", {"max_gen_toks": 3}),
                ("", {"until": ["e"], "max_gen_toks": 12}), ("To be, or not", {"max_gen_toks": 7}),
                ("Enter", {"max_gen_toks": 6, "do_sample": True, "temperature": 1.0}),
                ("What, ho!", {"until": ["o"], "max_gen_toks": 10})]
    batched = tiny_lm.generate_until([instance("generate_until", args) for args in requests], disable_tqdm=True)
    alone = [tiny_lm.generate_until([instance("generate_until", args)], disable_tqdm=True)[0] for args in requests]
    assert batched == alone and len(set(batched)) > 1


def test_readout_model_arg_scores_under_that_readout(tokenizer):
    from loopdb.readouts import scoring as engine
    from loopdb.evaluation.lm_eval_model import LoopDBLM, window_seed

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    context, continuation = [5, 9, 17, 3, 40], [11, 12, 13]
    tokens = context + continuation
    scores = {}
    for readout in ("predictive", "last", "elbo"):
        lm = LoopDBLM(model=model, tokenizer=tokenizer, readout=readout, num_loops=2, samples=2, seed=3)
        ((scores[readout], greedy),) = lm._loglikelihood_tokens([(None, context, continuation)])
        generator = torch.Generator().manual_seed(window_seed(3, tokens[:-1]))
        expected = engine.token_logprobs(model, torch.tensor([tokens]), 2, readout, 2, generator)[0, -3:].sum()
        assert scores[readout] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    assert len({round(v, 4) for v in scores.values()}) == 3  # three readouts, three different numbers


def test_bad_model_args_are_clear(tokenizer):
    from loopdb.evaluation.lm_eval_model import LoopDBLM

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="readout='median' is not available; choose one of predictive, last"):
        LoopDBLM(model=model, tokenizer=tokenizer, readout="median")
    with pytest.raises(ValueError, match="num_loops"):
        LoopDBLM(model=model, tokenizer=tokenizer, num_loops=0)
    with pytest.raises(ValueError, match="run=PATH"):
        LoopDBLM()


def test_every_objective_runs_through_the_same_adapter(tokenizer):
    """One adapter for every family the engine serves (DiffusionBlocks, BPTT, dense)."""
    from loopdb.config import DiffusionConfig, ModelConfig, preset
    from loopdb.evaluation.lm_eval_model import LoopDBLM
    from loopdb.models.looped import LoopedLM
    from loopdb.names import OBJECTIVES
    from loopdb.sampling import OBJECTIVE_LOOPS

    for name in OBJECTIVES:
        train = preset("tiny").apply_overrides({"objective": name, "mean_depth": "3"}).train
        config = ModelConfig(vocab_size=tokenizer.vocab_size, context=CONTEXT, d_model=32, n_heads=4, n_prelude=1,
                             n_core=1, n_coda=1)
        lm = LoopDBLM(model=LoopedLM(config, DiffusionConfig(), OBJECTIVE_LOOPS[train.objective]),
                      tokenizer=tokenizer, num_loops=2, samples=2)
        (logprob, _), = lm.loglikelihood([instance("loglikelihood", ("To be", " or not to be"))], disable_tqdm=True)
        assert math.isfinite(logprob), name
        assert isinstance(lm.generate_text("To be", ["\n"], 4), str)


# -- through lm-eval's own evaluator -------------------------------------------------------------------
def write_single_document_task(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS / "shakespeare" / "utils.py", folder / "utils.py")
    (folder / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    yaml = (TASKS / "shakespeare" / "shakespeare_bpb.yaml").read_text()
    yaml = yaml.replace("task: shakespeare_bpb", "task: one_passage_bpb").replace("bpb.jsonl", "doc.jsonl")
    (folder / "one_passage_bpb.yaml").write_text(yaml)
    return folder


def test_harness_bits_per_byte_equals_loopdb_score(tiny_lm, data_dir, tmp_path, monkeypatch):
    """Exact by construction: `loopdb score` scores windows of T+1 tokens (eval_windows) with
    loopdb.readouts.scoring.bits_per_byte; the harness's rolling windows after the newline prefix are the
    same windows when the passage starts after a newline and has a multiple of T tokens. With
    each window's noise seeded the same way (window_seed), both are the same computation, so
    they agree to float rounding (float32 logits summed in a different order: 1e-6 relative)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from loopdb.data.storage import load_tokens
    from loopdb.data.windows import eval_windows
    from loopdb.readouts import scoring as engine
    from loopdb.evaluation.lm_eval_model import window_seed

    tokenizer = tiny_lm.tok
    test_tokens = [int(t) for t in load_tokens(data_dir, "test")[:3000]]
    start = next(i for i in range(200, 3000) if test_tokens[i] == tokenizer.newline_id)
    passage_tokens = test_tokens[start + 1:start + 1 + 5 * CONTEXT]
    text = tokenizer.decode(passage_tokens)
    assert tokenizer.encode(text) == passage_tokens
    windows = eval_windows(torch.tensor([tokenizer.newline_id] + passage_tokens), CONTEXT)
    assert [(w.tolist(), CONTEXT) for w in windows] == tiny_lm.rolling_windows(passage_tokens)

    token_bytes = torch.as_tensor(tokenizer.token_bytes)
    nats, n_bytes = 0.0, 0
    for window in windows:  # what `loopdb score` computes, window by window with the harness's seeds
        bpb = engine.bits_per_byte(tiny_lm.model, [window], token_bytes, 2, samples=3,
                                   seed=window_seed(7, window[:-1].tolist()), batch_size=1)
        window_bytes = int(token_bytes[window[1:]].sum())
        nats += bpb * math.log(2) * window_bytes
        n_bytes += window_bytes
    assert n_bytes == len(text.encode("utf-8"))
    expected = nats / math.log(2) / n_bytes

    folder = write_single_document_task(tmp_path / "tasks" / "one", text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing depends on the working directory
    manager = TaskManager(include_path=str(folder.parent), include_defaults=False)
    results = simple_evaluate(model=tiny_lm, tasks=["one_passage_bpb"], task_manager=manager, bootstrap_iters=0,
                              log_samples=False)
    assert results["results"]["one_passage_bpb"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-6)


def test_simple_evaluate_on_the_shipped_tasks_from_another_cwd(tiny_run, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import loopdb.evaluation.lm_eval_model  # noqa: F401  (registers "loopdb")

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    assert {"shakespeare_bpb", "shakespeare_cloze", "shakespeare_continue"} <= set(manager.all_tasks)
    results = simple_evaluate(model="loopdb", model_args=f"run={tiny_run},num_loops=2,samples=2,seed=1,device=cpu",
                              tasks=["shakespeare_bpb", "shakespeare_cloze", "shakespeare_continue"],
                              task_manager=manager, limit=2, bootstrap_iters=0, log_samples=False, batch_size=8)
    metrics = results["results"]
    assert 0 < metrics["shakespeare_bpb"]["bits_per_byte,none"] < 20
    assert 0 <= metrics["shakespeare_cloze"]["acc,none"] <= 1
    assert 0 <= metrics["shakespeare_continue"]["word_f1,none"] <= 1
    assert results["config"]["num_loops"] == 2 and results["config"]["readout"] == "predictive"


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_loopdb_model(tiny_run, tmp_path):
    """python -m loopdb.lm_eval takes lm-eval's flags unchanged and writes lm-eval's results."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "loopdb.lm_eval", "--model", "loopdb", "--model_args",
               f"run={tiny_run},num_loops=2,samples=1", "--tasks", "shakespeare_bpb", "--include_path", str(TASKS),
               "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "out")]  # lm-eval defaults to cuda:0
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (results,) = list((tmp_path / "out").rglob("results*.json"))
    assert 0 < json.loads(results.read_text())["results"]["shakespeare_bpb"]["bits_per_byte,none"] < 20


def test_task_data_is_reproducible():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        import make_tasks
    finally:
        sys.path.remove(str(ROOT / "eval"))
    from loopdb.errors import DataError

    try:
        built = make_tasks.build()
    except DataError:
        pytest.skip("the default corpus is not installed")
    folder = TASKS / "shakespeare"
    for name, content in built.items():
        assert (folder / name).read_text(encoding="utf-8") == content, f"{name} is stale: run eval/make_tasks.py"
    assert sum(path.stat().st_size for path in TASKS.rglob("*") if path.is_file()) < 1_000_000
    passages = [json.loads(line)["text"] for line in built["bpb.jsonl"].splitlines()]
    assert "".join(passages).startswith("MACBETH") and "Whom we invite to see us crown'd at Scone." in passages[-1]


# -- loopdb eval ------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    from loopdb.cli import main

    code = main([str(part) for part in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_sweeps_loops_with_a_users_task_folder(tiny_run, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    users = tmp_path / "my_tasks"  # a task folder the command has never seen
    shutil.copytree(TASKS / "shakespeare", users)
    for path in users.glob("*.yaml"):
        path.write_text(path.read_text().replace("task: shakespeare_", "task: mine_"))
        path.rename(path.with_name(path.name.replace("shakespeare_", "mine_")))
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "sweep.json"
    tb_before = set((tiny_run / "tb").iterdir())
    code, out, err = run_cli(capsys, "eval", tiny_run, "--tasks", "shakespeare_bpb,mine_cloze", "--loops", "1,3",
                             "--include-path", users, "--limit", "2", "--samples", "2", "--batch-size", "4",
                             "--device", "cpu", "--output", output)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert set(report["loops"]) == {"1", "3"}
    assert report["loops"]["3"]["config"]["num_loops"] == 3
    assert set(report["loops"]["1"]["results"]) == {"shakespeare_bpb", "mine_cloze"}
    assert "| shakespeare_bpb | bits_per_byte |" in out and "K=3" in out
    assert output.with_suffix(".png").stat().st_size > 1000
    (events,) = set((tiny_run / "tb").iterdir()) - tb_before
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"eval/shakespeare_bpb/bits_per_byte@1", "eval/shakespeare_bpb/bits_per_byte@3",
            "eval/mine_cloze/acc@3"} <= set(tags)


def test_cli_eval_user_errors_are_one_line_exit_2(tiny_run, tmp_path, capsys, monkeypatch):
    output = tmp_path / "x.json"
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "no_such_task", "--output", output)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_task" in err and "shakespeare_bpb" in err  # names the local tasks

    # a task whose data cannot be fetched (as a hub task offline): the harness's error, in one line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "utils.py").write_text("def load(**kwargs):\n"
                                     "    raise ConnectionError(\"Couldn't reach 'someone/data' on the Hub\")\n")
    (broken / "hub_task.yaml").write_text("task: hub_task\ncustom_dataset: !function utils.load\n"
                                          "output_type: loglikelihood_rolling\ntest_split: test\n"
                                          "doc_to_target: text\n")
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "hub_task", "--include-path", broken,
                           "--output", output)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Couldn't reach" in err

    code, _, err = run_cli(capsys, "eval", tmp_path / "missing_run", "--tasks", "shakespeare_bpb", "--output", output)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "shakespeare_bpb", "--loops", "0", "--output", output)
    assert code == 2 and "--loops" in err

    # lm-eval not installed: say how to get it
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for module in ("lm_eval_model", "lm_eval_sweep"):
        monkeypatch.delitem(sys.modules, f"loopdb.evaluation.{module}", raising=False)
        monkeypatch.delattr(sys.modules["loopdb.evaluation"], module, raising=False)
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "shakespeare_bpb", "--output", output)
    assert code == 2 and 'pip install -e ".[eval]"' in err and len(err.strip().splitlines()) == 1
    assert not output.exists()


def test_a_metric_reported_per_difficulty_is_one_panel_against_difficulty(tmp_path):
    from loopdb.evaluation.lm_eval_sweep import metric_panels, plot_metrics

    summary = {"s3_x": {"exact_match": {"1": 0.4, "16": 0.9},
                        **{f"exact_match_d{d}": {"1": 1.0 / d, "16": 1.0} for d in (2, 3, 12)}},
               "text": {"bits_per_byte": {"1": 2.5, "16": 2.6}}}
    panels = metric_panels(summary)
    assert [(task, metric) for task, metric, _, _ in panels] == [("s3_x", "exact_match"), ("text", "bits_per_byte")]
    assert sorted(panels[0][3]) == [2, 3, 12] and panels[1][3] is None
    assert plot_metrics(summary, [1, 16], tmp_path / "plot.png").stat().st_size > 0
