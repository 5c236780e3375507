import json

import pytest

from conftest import SMALL_RUN
from loopdb.readouts import scoring as engine
from loopdb.readouts import quality
from loopdb.cli import main


def test_study_trains_variants_and_scores_every_readout(capsys, data_dir, tmp_path):
    judge = tmp_path / "judge"
    assert main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(judge), "--quiet",
                 *SMALL_RUN, "--max_steps=2", "--objective=dense"]) == 0
    small = {arg[2:].split("=")[0]: arg.split("=")[1] for arg in SMALL_RUN}
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({
        "plain": small,
        "rollouts": {**small, "rollout_fraction": 1.0, "rollout_loops": 4, "seeds": [0, 1]},
        "plain-stop-early": {**small, "grid_sigma_last": 0.3},  # inference only: shares plain's training
    }))
    out = tmp_path / "study"
    code = main(["study", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "2",
                 "--variants", str(variants), "--loops", "1,2", "--max-windows", "2", "--samples", "1",
                 "--judge", str(judge), "--generations", "2", "--generation-length", "5"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"plain", "rollouts", "plain-stop-early"}
    early = results["variants"]["plain-stop-early"]["seeds"]["0"]
    assert early["run"] == "plain-s0" and not (out / "plain-stop-early-s0").exists()
    assert early["readouts"]["predictive"]["1"] == member_of(results, "plain")["readouts"]["predictive"]["1"]
    assert early["readouts"]["predictive"]["2"] != member_of(results, "plain")["readouts"]["predictive"]["2"]
    assert set(results["variants"]["rollouts"]["seeds"]) == {"0", "1"}
    member = results["variants"]["plain"]["seeds"]["0"]
    assert set(member["readouts"]) == {"predictive", "last", "elbo"}
    assert set(member["readouts"]["elbo"]) == {"1", "2"}
    assert member["samples"]["2"]["gen_ppl"] > 1 and 0 < member["samples"]["2"]["distinct2"] <= 1
    assert 0 <= member["samples"]["2"]["mauve"] <= 1 and results["judge_bpb"] > 0
    assert set(results["reference_texts"]) == {"held-out text", "shuffled held-out text", "uniform random tokens"}
    flops = results["variants"]["plain"]["flops"]  # counted over a real step = computed from the config
    assert flops["counted"] == flops["analytic"] > 0 and results["variants"]["rollouts"]["flops"] is None
    table = (out / "results.md").read_text()
    assert "### elbo bits per byte" in table and "| rollouts | 2 |" in table and "+-" in table
    assert (out / "predictive_bits_per_byte_vs_loops.png").exists()
    assert (out / "generative_perplexity_vs_loops.png").exists() and (out / "MAUVE_vs_loops.png").exists()
    assert "### MAUVE" in table and "GFLOP/step counted" in table

    def extend(variant_specs, generations=2):  # run the study again on the same folder
        variants.write_text(json.dumps(variant_specs))
        capsys.readouterr()
        assert main(["study", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "2",
                     "--variants", str(variants), "--loops", "1,2", "--max-windows", "2", "--samples", "1",
                     "--judge", str(judge), "--generations", str(generations), "--generation-length", "5"]) == 0
        return capsys.readouterr().err, json.loads((out / "results.json").read_text())

    # extending the study (one more seed for "plain") trains and scores only the new member
    err, again = extend({"plain": {**small, "seeds": [0, 1]}})
    assert "plain seed 0: scores reused" in err and "plain seed 1: scores reused" not in err
    assert again["variants"]["plain"]["seeds"]["0"] == member and set(again["variants"]["plain"]["seeds"]) == {"0", "1"}

    # judging with more generations re-scores the samples only; a variant whose sampler changed is re-scored
    err, third = extend({"plain": small, "plain-stop-early": {**small, "grid_sigma_last": 0.3}}, generations=3)
    assert "plain seed 0: scores reused from results.json (scoring samples anew)" in err
    plain = member_of(third, "plain")
    assert plain["readouts"] == member["readouts"] and plain["samples"]["2"]["samples"] == 3
    err, fourth = extend({"plain-stop-early": {**small, "grid_sigma_last": 0.5}}, generations=3)
    assert "plain-stop-early seed 0: scores reused" not in err
    stop = member_of(fourth, "plain-stop-early")["readouts"]["predictive"]
    assert stop["2"] != early["readouts"]["predictive"]["2"] and stop["1"] == early["readouts"]["predictive"]["1"]


def member_of(results, name, seed="0"):
    return results["variants"][name]["seeds"][seed]


def test_study_rejects_a_bad_variants_file(capsys, tmp_path):
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"typo": {"rollout_fraktion": 0.5}}))
    code = main(["study", "--out", str(tmp_path / "s"), "--steps", "2", "--variants", str(variants)])
    assert code == 2 and "unknown config key 'rollout_fraktion'" in capsys.readouterr().err
    variants.write_text("{not json")
    assert main(["study", "--out", str(tmp_path / "s"), "--steps", "2", "--variants", str(variants)]) == 2


def test_study_budgets_are_checked_before_any_training(capsys, data_dir, tmp_path):
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"dense": {"objective": "dense"}}))
    base = ["study", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "s"), "--variants", str(variants)]
    assert main([*base, "--steps", "2", "--budget-flops", "1e12"]) == 2
    assert "--steps and --budget-flops are two budgets" in capsys.readouterr().err
    assert main([*base, "--steps", "2", "--judge-preset", "tiny-judge"]) == 2
    assert "--judge-preset needs --judge" in capsys.readouterr().err
    assert main([*base, "--budget-flops", "1e6"]) == 2
    assert "less than one training step of dense" in capsys.readouterr().err
    assert not (tmp_path / "s" / "dense-s0").exists()


def test_one_study_command_trains_at_equal_time_and_at_equal_flops(data_dir, tmp_path):
    small = {arg[2:].split("=")[0]: arg.split("=")[1] for arg in SMALL_RUN}
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"dense": {**small, "objective": "dense"}}))
    out = tmp_path / "s"
    assert main(["study", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--variants", str(variants),
                 "--budget-minutes", "0.002", "--budget-clock", "cpu", "--budget-flops", "5e8", "--readouts",
                 "predictive", "--loops", "1", "--max-windows", "2", "--samples", "1"]) == 0
    by_flops = json.loads((out / "equal-flops" / "results.json").read_text())
    member = member_of(by_flops, "dense")
    assert member["train"]["steps"] == int(5e8 // by_flops["variants"]["dense"]["flops"]["analytic"])
    assert json.loads((out / "equal-time" / "results.json").read_text())["budget"]["minutes"] == 0.002
    page = (out / "results.md").read_text()
    assert "## Equal training time" in page and "## Equal training FLOPs" in page and "5e+08 training FLOPs" in page


def test_distinct_n():
    assert quality.distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert quality.distinct_n([[1, 1, 1, 1]], 2) == 1 / 3


def test_a_member_on_another_task_trains_on_its_own_task(tmp_path, capsys):
    variants = tmp_path / "v.json"
    tiny = {"d_model": 32, "n_heads": 2, "batch_size": 4, "eval_examples": 2}
    variants.write_text(json.dumps({"hops": {**tiny, "objective": "dense", "task": "hops", "context": 40,
                                             "train_difficulties": "4", "test_difficulties": "2-8"}}))
    out = tmp_path / "s"
    assert main(["study", "--preset", "depth-tiny", "--out", str(out), "--variants", str(variants), "--steps", "2",
                 "--readouts", "accuracy", "--loops", "1", "--max-windows", "2", "--split", "test"]) == 0
    assert "tasks/s3" not in capsys.readouterr().err  # the preset's task folder is not handed to the member
    from loopdb.runs.folder import run_data_dir
    assert run_data_dir(out / "hops-s0").name == "hops"
    assert json.loads((out / "results.json").read_text())["variants"]["hops"]["seeds"]["0"]["readouts"]["accuracy"]


def test_variants_are_checked_on_the_studys_preset(tmp_path):
    from loopdb.errors import ConfigError
    from loopdb.evaluation.study import load_variants

    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"opened": {"start_token": True}}))  # valid for a task preset only
    assert load_variants(variants, "depth-tiny")["opened"]["overrides"] == {"start_token": "true"}
    with pytest.raises(ConfigError, match="start_token opens reasoning-task sequences"):
        load_variants(variants, "tiny")


def test_a_seed_without_scores_is_not_counted_and_a_skipped_readout_is_tried_again():
    from loopdb.evaluation.study import _reuse, markdown_tables

    scored = {"train": {"steps": 10}, "readouts": {"accuracy": {"1": 0.5, "2": 0.75}}}
    unscored = {"train": {"steps": 10}, "readouts": {}, "skipped": ["accuracy"]}
    results = {"preset": "depth-tiny", "budget": {"minutes": 1.0, "steps": None, "clock": "cpu"}, "split": "test",
               "max_windows": 4, "samples": 1,
               "variants": {"joint": {"overrides": {}, "flops": None, "seeds": {"0": scored, "1": unscored}}}}
    assert "| joint | 1 | 0.500 | 0.750 |" in markdown_tables(results, [1, 2])
    member, missing = _reuse(unscored, {"steps": 10}, ["accuracy"], [1, 2], judged=False)
    assert missing == ["accuracy"] and "skipped" not in member


@pytest.mark.parametrize("variants, preset_name", [("study_depth.json", "depth-tiny"),
                                                   ("study_depth_hops.json", "depth-tiny"),
                                                   ("study_small.json", "small"),
                                                   ("study_recurrent_text.json", "small")])
def test_the_shipped_variants_files_load_on_the_presets_their_commands_name(variants, preset_name):
    """A key or value a member cannot take fails before hours of training, not in the middle of them."""
    from pathlib import Path

    from loopdb.evaluation.study import load_variants

    assert load_variants(Path(__file__).parent.parent / "eval" / variants, preset_name)
