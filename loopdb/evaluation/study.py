"""``loopdb study``: which training recipe makes more loops pay (docs/method.md#scoring)?

Trains each variant of a variants file (a JSON object: name -> config overrides,
optionally with "seeds": [...]) at equal training time, equal training FLOPs (each
member's steps from its FLOPs per step, loopdb.evaluation.flops) or equal steps, each in
its own process, then scores every member at each loop count on every readout
and on sample quality (generative perplexity under a dense judge, MAUVE on the judge's
features against held-out text, distinct-2/3). A judge named with its preset is trained
once and reused; ``run_equal_compute`` runs the study at equal time and at equal FLOPs.
Writes results.json, results.md (one table per readout, mean and spread over
seeds) and one PNG per readout; logs ``study/<readout>@K`` to each member's
tensorboard. Finished members are reused, and so are their scores when results.json
already holds them under the same settings, so an interrupted or extended study
(say, more seeds for the best variants) only trains and scores what is new.
Variants that differ only in inference settings (INFERENCE_ONLY keys, e.g. the
grid's last sigma) share one trained member and are scored with their own sampler.

Example variants file:
    {"plain": {}, "edm-weight": {"loss_weight": "edm"},
     "rollouts": {"rollout_fraction": 0.5, "seeds": [0, 1]}}
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from ..data.storage import load_meta, load_tokenizer, load_tokens
from ..config import preset
from ..errors import ConfigError
from ..readouts.quality import (MAUVE_FEATURES, distinct_n, judge_features, judge_perplexity, mauve_score,
                                sample_quality)
from ..runs.folder import load_model, run_data_dir
from ..names import LOOP_FREE_READOUTS, STUDY_DEFAULT_READOUTS
from ..sampling import sampler_of
from .flops import step_flops
from .members import score_member, train_member

INFERENCE_ONLY = ("grid", "solver", "grid_sigma_last", "wavefront")  # change the sampler, not the trained weights


def load_variants(path, preset_name: str = "tiny") -> dict[str, dict]:
    """Variants file -> {name: {"overrides": {...}, "seeds": [...]}}; ConfigError for anything off,
    each variant checked on the study's preset (``preset_name``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"variants file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"variants file {path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"variants file {path} must be a JSON object of name -> overrides")
    variants = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"variant {name!r}: expected an object of config overrides")
        spec = dict(spec)
        seeds = spec.pop("seeds", [0])
        overrides = {key: ",".join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool)
                     else str(v) for key, v in spec.items()}
        preset(preset_name).apply_overrides(dict(overrides))  # reject unknown keys and bad values before any training
        sampler = {key: overrides.pop(key) for key in INFERENCE_ONLY if key in overrides}
        variants[name] = {"overrides": overrides, "sampler": sampler, "seeds": [int(s) for s in seeds]}
    return variants


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def run_study(preset_name: str, out, data_dir, variants_file, budget_minutes: float | None = None,
              steps: int | None = None, loops=(1, 2, 4, 8, 16), readouts=STUDY_DEFAULT_READOUTS, samples: int = 2,
              max_windows: int | None = 32, split: str = "val", judge: str | None = None,
              generations: int = 8, generation_length: int = 48, budget_clock: str = "wall",
              budget_flops: float | None = None, judge_preset: str | None = None) -> dict:
    """``budget_flops``: each member trains for budget_flops // (its analytic FLOPs per step) steps;
    ``judge_preset``: train the dense ``judge`` run from that preset first, unless it already finished."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = load_variants(variants_file, preset_name)
    if judge and judge_preset:
        train_member(Path(judge), judge_preset, Path(data_dir), None, None, ["--objective=dense"])
    judge_model = load_model(judge)[0] if judge else None
    if judge and Path(run_data_dir(judge)).resolve() != Path(data_dir).resolve():
        raise ConfigError(f"the judge {judge} was trained on other data ({run_data_dir(judge)}); "
                          "it must share the study's tokenizer")
    newline = load_tokenizer(data_dir).encode("\n")
    results = {"preset": preset_name, "budget": {"minutes": budget_minutes, "steps": steps, "flops": budget_flops,
                                                 "clock": budget_clock},
               "split": split,
               "samples": samples, "max_windows": max_windows, "judge": judge, "generations": generations,
               "generation_length": generation_length, "mauve_features": MAUVE_FEATURES if judge else None,
               "variants": {}}
    reference = None
    if judge:
        results["judge_bpb"] = score_member(Path(judge), (1,), samples, max_windows, 0, split=split)["1"]
        results["judge_parameters"] = judge_model.num_parameters()
        texts = held_out_texts(data_dir, split, 2 * generations, generation_length)
        reference = judge_features(judge_model, texts[0::2])
        results["reference_texts"] = reference_quality(judge_model, newline, reference, texts[1::2])
    previous = _previous_members(out / "results.json", results)
    trained_runs = {}  # (training overrides, seed) -> run folder, so inference-only variants share it
    for name, variant in variants.items():
        members = {}
        settings = {**variant["overrides"], **variant["sampler"]}
        member_data = _member_data_dir(preset_name, variant["overrides"], data_dir)
        flops = _variant_flops(preset_name, variant["overrides"], member_data, required=budget_flops is not None)
        member_steps = steps
        if budget_flops:
            member_steps = int(budget_flops // flops["analytic"])
            if member_steps < 1:
                raise ConfigError(f"--budget-flops {budget_flops:.3g} is less than one training step of {name} "
                                  f"({flops['analytic']:.3g} FLOPs); give a larger budget")
        for seed in variant["seeds"]:
            run = trained_runs.setdefault((tuple(sorted(variant["overrides"].items())), seed), out / f"{name}-s{seed}")
            overrides = [f"--{k}={v}" for k, v in variant["overrides"].items()] + [f"--seed={seed}"]
            summary = train_member(run, preset_name, member_data, budget_minutes, member_steps, overrides,
                                   budget_clock)
            earlier = previous.get((name, str(seed)))
            if earlier is not None and (earlier["train"] != summary or earlier["overrides"] != settings):
                earlier = None  # retrained, or the variant's settings changed: nothing of it holds
            member, missing = _reuse(earlier, summary, readouts, loops, judge is not None)
            member["run"] = run.name
            if member["readouts"] or "samples" in member:
                print(f"[study] {name} seed {seed}: scores reused from results.json"
                      + (f" (scoring {', '.join(missing)} anew)" if missing else ""), file=sys.stderr)
            for readout in (r for r in readouts if r in missing):
                try:
                    member["readouts"][readout] = score_member(run, loops, samples, max_windows, 0, readout=readout,
                                                               split=split, sampler=variant["sampler"])
                except ValueError as error:  # e.g. the ELBO of a dense or BPTT variant, the anchor of a run without one
                    member.setdefault("skipped", []).append(readout)
                    print(f"[study] {name}: {readout} skipped: {error}", file=sys.stderr)
            if "samples" in missing:
                model = load_model(run, sampler=variant["sampler"])[0]
                counts = loops if sampler_of(model).has_loops else (1,)
                member["samples"] = {}
                for k in counts:
                    print(f"[study] {name} seed {seed}: {generations} samples at K={k}", file=sys.stderr)
                    member["samples"][str(k)] = sample_quality(model, judge_model, newline, k, generations,
                                                               generation_length, reference=reference)
            if missing:
                _log_member(run, name, member)
            members[str(seed)] = member
        results["variants"][name] = {"overrides": settings, "flops": flops, "seeds": members}
        (out / "results.json").write_text(json.dumps(results, indent=2))  # after each variant: nothing lost
    if judge:
        _check_judge(results)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_tables(results, loops))
    _plots(results, out, loops)
    return results


SCORE_SETTINGS = ("preset", "budget", "split", "samples", "max_windows")  # the readouts depend on these
SAMPLE_SETTINGS = ("judge", "generations", "generation_length", "mauve_features")  # and sample quality on these too


def run_equal_compute(preset_name: str, out, data_dir, variants_file, budget_minutes: float, budget_flops: float,
                      **settings) -> dict:
    """The study twice, into out/equal-time (every member ``budget_minutes`` on its ``budget_clock``) and
    out/equal-flops (every member ``budget_flops`` training FLOPs); out/results.md holds both pages."""
    out = Path(out)
    studies = {"equal-time": run_study(preset_name, out / "equal-time", data_dir, variants_file,
                                       budget_minutes=budget_minutes, **settings),
               "equal-flops": run_study(preset_name, out / "equal-flops", data_dir, variants_file,
                                        budget_flops=budget_flops, **settings)}
    titles = {"equal-time": "Equal training time", "equal-flops": "Equal training FLOPs"}
    (out / "results.md").write_text("\n".join(f"## {titles[folder]}\n\n" + (out / folder / "results.md").read_text()
                                              for folder in studies))
    return studies


def held_out_texts(data_dir, split: str, count: int, length: int) -> list[list[int]]:
    """``count`` texts of ``length`` tokens evenly spaced over a split: what samples are compared with."""
    tokens = load_tokens(data_dir, split)
    if len(tokens) < count * length:
        raise ConfigError(f"the {split} split has {len(tokens)} tokens, fewer than {count} texts of {length}; "
                          "ask for fewer --generations or a shorter --generation-length")
    stride = (len(tokens) - length) // max(1, count - 1)
    return [[int(t) for t in tokens[i * stride:i * stride + length]] for i in range(count)]


def reference_quality(judge, prompt: list[int], reference, texts: list[list[int]], seed: int = 0) -> dict:
    """Sample quality of three text sets of known quality, scored as a member's samples are: held-out texts
    (other than the reference's: the best a member can do), the same texts with their tokens shuffled
    (the right words in a wrong order) and uniform random tokens of the same lengths."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = [[text[i] for i in torch.randperm(len(text), generator=generator).tolist()] for text in texts]
    random_tokens = [torch.randint(judge.config.vocab_size, (len(text),), generator=generator).tolist()
                     for text in texts]
    scores = {}
    for name, group in (("held-out text", texts), ("shuffled held-out text", shuffled),
                        ("uniform random tokens", random_tokens)):
        scores[name] = {"gen_ppl": judge_perplexity(judge, prompt, group, seed), "distinct2": distinct_n(group, 2),
                        "mauve": mauve_score(judge_features(judge, group), reference, seed)}
    return scores


def _member_data_dir(preset_name: str, overrides: dict, data_dir) -> Path:
    """A member's data as its family finds it (a variant may name another task than the preset's:
    its own task's folder), given the study's data."""
    from ..families import family_of

    config = preset(preset_name).apply_overrides(dict(overrides))
    return Path(family_of(config).data_dir(str(data_dir), config))


def _variant_flops(preset_name: str, overrides: dict, data_dir, required: bool) -> dict | None:
    """The variant's FLOPs per training step (loopdb.evaluation.flops.step_flops), or None where the count
    does not cover its recipe (then a FLOP budget is refused)."""
    config = preset(preset_name).apply_overrides(dict(overrides))
    config.model.vocab_size = load_meta(data_dir)["vocab_size"]
    try:
        return step_flops(config, data_dir)
    except ConfigError:
        if required:
            raise
        return None


def _check_judge(results: dict) -> None:
    """Record whether the judge's bits per byte beat every member's at every K (a judge weaker than a
    member says little about its samples); warn when it does not."""
    scores = [value for variant in results["variants"].values() for member in variant["seeds"].values()
              for value in member["readouts"].get("predictive", {}).values()]
    results["judge_beats_every_member"] = all(results["judge_bpb"] < value for value in scores)
    if not results["judge_beats_every_member"]:
        print(f"[study] warning: the judge ({results['judge_bpb']:.3f} bits per byte) is not better than every "
              f"member (best {min(scores):.3f}); train a stronger judge", file=sys.stderr)


def _previous_members(path: Path, settings: dict) -> dict:
    """(variant, seed) -> member of an earlier results.json made with the same scoring settings; its
    samples are dropped unless they were judged the same way."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier.get(key) != settings[key] for key in SCORE_SETTINGS):
        return {}
    same_samples = all(earlier.get(key) == settings[key] for key in SAMPLE_SETTINGS)
    members = {}
    for name, variant in earlier.get("variants", {}).items():
        for seed, member in variant["seeds"].items():
            member = {**member, "overrides": variant["overrides"]}
            if not same_samples:
                member.pop("samples", None)
            members[(name, seed)] = member
    return members


def _reuse(earlier: dict | None, summary: dict, readouts, loops, judged: bool) -> tuple[dict, list[str]]:
    """A member record holding what ``earlier`` (same run, same settings) already scored, and the list of
    what is still missing: readout names, and "samples" when a judge is given."""
    member = {"train": summary, "readouts": {}}
    every_count = {"1"} if summary.get("objective") == "dense" else {str(k) for k in loops}
    earlier = earlier or {}
    missing = []
    for readout in readouts:
        counts = {"1"} if readout in LOOP_FREE_READOUTS else every_count
        # a readout skipped before is tried again: an inapplicable one fails at once, a failed load may now succeed
        if counts <= set(earlier.get("readouts", {}).get(readout, {})):
            member["readouts"][readout] = earlier["readouts"][readout]
        else:
            missing.append(readout)
    if judged:
        if every_count <= set(earlier.get("samples", {})):
            member["samples"] = earlier["samples"]
        else:
            missing.append("samples")
    return member, missing


def _log_member(run: Path, variant: str, member: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tb"))
    step = member["train"]["steps"]
    for readout, values in member["readouts"].items():
        for k, value in values.items():
            writer.add_scalar(f"study/{variant}/{readout}@{k}", value, step)
    for k, quality in member.get("samples", {}).items():
        for metric in ("gen_ppl", "mauve", "distinct2", "distinct3"):
            if metric in quality:
                writer.add_scalar(f"study/{variant}/{metric}@{k}", quality[metric], step)
    writer.close()


def _curves(results: dict, metric) -> dict[str, dict[int, tuple[float, float]]]:
    """variant -> {K: (mean, half-range over seeds)} for metric(member) -> {K: value}."""
    curves = {}
    for name, variant in results["variants"].items():
        per_seed = [metric(member) for member in variant["seeds"].values()]
        per_seed = [values for values in per_seed if values]
        if not per_seed:
            continue
        shared = set.intersection(*(set(values) for values in per_seed))
        curves[name] = {int(k): _spread([values[k] for values in per_seed]) for k in shared}
    return curves


def _metrics(results: dict) -> dict[str, callable]:
    readouts = sorted({r for v in results["variants"].values() for m in v["seeds"].values() for r in m["readouts"]})
    metrics = {(r if r.startswith("accuracy") else f"{r} bits per byte"): (lambda m, r=r: m["readouts"].get(r, {}))
               for r in readouts}
    if results.get("judge"):
        metrics["MAUVE"] = lambda m: {k: q["mauve"] for k, q in m.get("samples", {}).items() if "mauve" in q}
        metrics["generative perplexity"] = lambda m: {k: q["gen_ppl"] for k, q in m.get("samples", {}).items()}
        metrics["distinct-2"] = lambda m: {k: q["distinct2"] for k, q in m.get("samples", {}).items()}
    return metrics


def _budget_words(budget: dict) -> str:
    if budget["steps"]:
        return f"{budget['steps']} steps"
    if budget.get("flops"):
        return f"{budget['flops']:.3g} training FLOPs"
    return f"{budget['minutes']} training minutes" + (" of CPU time" if budget.get("clock") == "cpu" else "")


def markdown_tables(results: dict, loops) -> str:
    lines = [f"Preset {results['preset']}, {_budget_words(results['budget'])} per member; "
             f"{results['split']} split, {results['max_windows']} windows, {results['samples']} noise draws. "
             "Cells: mean over seeds (+- half the range when there are several)."]
    if results.get("judge"):
        verdict = {True: "better than every member at every K", False: "NOT better than every member",
                   None: "not compared"}[results.get("judge_beats_every_member")]
        lines.append(f"Judge: {results['judge']} (dense, {results['judge_parameters'] / 1e6:.2f}M parameters), "
                     f"{results['split']} bits per byte {results['judge_bpb']:.3f}: {verdict}. Samples: "
                     f"{results['generations']} per member and K, {results['generation_length']} tokens after a "
                     f"newline, temperature 1; MAUVE against as many held-out {results['split']} texts of that "
                     f"length, on features of the {results['mauve_features']}.")
        for name, quality in results.get("reference_texts", {}).items():
            lines.append(f"{name[0].upper() + name[1:]}, scored the same way: MAUVE {quality['mauve']:.3f}, "
                         f"generative perplexity {quality['gen_ppl']:.1f}, distinct-2 {quality['distinct2']:.3f}.")
    lines += _training_table(results)
    if results.get("judge"):
        lines += _per_member_table(results, loops)
    for title, metric in _metrics(results).items():
        curves = _curves(results, metric)
        lines += ["", f"### {title}", "", "| variant | seeds | " + " | ".join(f"K={k}" for k in loops) + " |",
                  "|" + "---|" * (2 + len(loops))]
        for name, curve in curves.items():
            seeds = sum(1 for member in results["variants"][name]["seeds"].values() if metric(member))
            cells = [f"{curve[k][0]:.3f}" + (f" +- {curve[k][1]:.3f}" if curve[k][1] else "") if k in curve else ""
                     for k in loops]
            lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _per_member_table(results: dict, loops) -> list[str]:
    """One row per variant and K with the sample-quality columns beside bits per byte and steps."""
    metrics = _metrics(results)
    columns = [title for title in ("predictive bits per byte", "MAUVE", "generative perplexity", "distinct-2")
               if title in metrics]
    curves = {title: _curves(results, metrics[title]) for title in columns}
    lines = ["", "### per member and K", "", "| variant | K | steps | " + " | ".join(columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for name, variant in results["variants"].items():
        steps = statistics.fmean(member["train"]["steps"] for member in variant["seeds"].values())
        for k in loops:
            cells = [curves[title].get(name, {}).get(k) for title in columns]
            if all(cell is None for cell in cells):
                continue
            lines.append(f"| {name} | {k} | {steps:.0f} | " + " | ".join(
                "" if cell is None else f"{cell[0]:.3f}" + (f" +- {cell[1]:.3f}" if cell[1] else "") for cell in cells)
                + " |")
    return lines


def _training_table(results: dict) -> list[str]:
    """Steps, FLOPs per step (counted over a real step / from the config) and training compute per variant."""
    rows = []
    for name, variant in results["variants"].items():
        trained = [member["train"] for member in variant["seeds"].values()]
        steps = statistics.fmean(t["steps"] for t in trained)
        cpu = [t["train_cpu_seconds"] for t in trained if "train_cpu_seconds" in t]
        flops = variant.get("flops")
        cells = ([f"{flops['counted'] / 1e9:.3f}", f"{flops['analytic'] / 1e9:.3f}",
                  f"{steps * flops['analytic'] / 1e12:.3g}"] if flops else ["", "", ""])
        rows.append(f"| {name} | {steps:.0f} | " + " | ".join(cells) + " | "
                    + (f"{statistics.fmean(cpu):.0f}" if cpu else "") + " |")
    return ["", "### training", "", "Steps: mean over seeds. GFLOP per step: counted by FlopCounterMode over a real "
            "step (BPTT at its mean depth) / computed from the config (BPTT: expected over its depth sampler); "
            "matrix products only, forward and backward (loopdb.evaluation.flops).", "",
            "| variant | steps | GFLOP/step counted | GFLOP/step analytic | training TFLOP | CPU s |",
            "|---|---|---|---|---|---|", *rows]


def _plots(results: dict, out: Path, loops) -> None:
    from .plots import PlotUnavailable, plot_against_loops

    for title, metric in _metrics(results).items():
        curves = {name: {k: mean for k, (mean, _) in curve.items()} for name, curve in _curves(results, metric).items()}
        filename = title.replace(" ", "_").replace("-", "") + "_vs_loops.png"
        try:
            plot_against_loops(curves, out / filename, title,
                               title=f"{results['preset']}, {_budget_words(results['budget'])} per member")
        except PlotUnavailable as error:
            print(f"[study] no plots: {error}", file=sys.stderr)
            return
