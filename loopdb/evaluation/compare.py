"""``loopdb compare``: DiffusionBlocks vs BPTT (Huginn) vs dense on the same data.

Each objective trains the same LoopedLM from the same seed, in its own process
(so its peak resident memory is its own), for the same training time, or the same
number of steps with ``--steps``. Each is then scored on the test split at every
loop count with the same readout, windows and noise seed. Finished members are
not retrained when the command is run again, so an interrupted comparison resumes.

Unlike a study (loopdb.evaluation.study), the report is about what each member's training cost:
steps, tokens seen, milliseconds per step and peak resident memory beside the scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.storage import load_meta, load_tokens
from ..data.windows import eval_windows
from ..runs.folder import load_model
from .members import score_member, train_member

DEFAULT_LOOPS = (1, 2, 4, 8, 16, 32, 64)
COMPARED = ("diffusion", "bptt", "dense")  # `loopdb compare`: DiffusionBlocks vs BPTT vs dense (ouro: `loopdb study`)


def markdown_table(results: dict, loops, unigram: float) -> str:
    header = "| model | steps | tokens seen | step ms | peak RSS MB | " + " | ".join(f"K={k}" for k in loops) + " |"
    lines = [header, "|" + "---|" * (5 + len(loops))]
    for name, member in results["models"].items():
        cells = [f"{member['bpb'][str(k)]:.3f}" if str(k) in member["bpb"] else "" for k in loops]
        lines.append(f"| {name} | {member['steps']} | {member['tokens_seen']:,} | {member['step_ms']:.0f} | "
                     f"{member['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
    budget = results["budget"]
    lines.append("")
    lines.append(f"Test bits per byte (predictive readout, {results['samples']} noise draws, "
                 f"{results['windows']} windows); unigram line {unigram:.3f}. "
                 + (f"Equal steps: {budget['steps']}." if budget["steps"] else
                    f"Equal training time: {budget['minutes']} minutes per model."))
    return "\n".join(lines) + "\n"


def run_compare(preset: str, out, data_dir, budget_minutes: float | None = None, steps: int | None = None,
                loops=DEFAULT_LOOPS, samples: int = 2, max_windows: int | None = 64, seed: int = 0,
                overrides: list[str] = ()) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, f"--seed={seed}"]
    models = {}
    for objective in COMPARED:
        summary = train_member(out / objective, preset, Path(data_dir), budget_minutes, steps,
                               [*overrides, f"--objective={objective}"])
        models[objective] = {**summary, "bpb": score_member(out / objective, loops, samples, max_windows, seed)}
    meta = load_meta(data_dir)
    windows = len(eval_windows(load_tokens(data_dir, "test"),
                               load_model(out / COMPARED[0])[1].model.context, max_windows))
    results = {
        "models": models,
        "preset": preset,
        "budget": {"minutes": budget_minutes, "steps": steps},
        "readout": "predictive",
        "samples": samples,
        "windows": windows,
        "seed": seed,
        "unigram_bpb": meta["unigram_test_bpb"],
        "step_ratio_diffusion_vs_bptt": models["diffusion"]["step_ms"] / models["bptt"]["step_ms"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results, loops, meta["unigram_test_bpb"]))
    try:
        from .plots import PlotUnavailable, plot_against_loops

        plot_against_loops({name: {int(k): v for k, v in m["bpb"].items()} for name, m in models.items()},
                           out / "bpb_vs_loops.png", "test bits per byte",
                           title=f"{preset}: " + (f"{steps} steps each" if steps else f"{budget_minutes} min each"),
                           reference={"unigram": meta["unigram_test_bpb"]})
    except PlotUnavailable as error:
        print(f"[compare] no plot: {error}", file=sys.stderr)
    return results
