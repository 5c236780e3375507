"""``loopdb bench decode``: how a drafting run (draft width L > 1, anchor head) decodes, per K.

For the same prompts (``prompts`` windows of the test split, ``prompt_tokens`` each, evenly
spaced) and ``tokens`` new tokens each:
- greedy: plain greedy decoding with the anchor head, one clean-stream step per token;
- speculative, per K: self-speculative decoding (loopdb.readouts.drafting), its mean number
  of accepted drafts per verification, tokens per verification (accepted + the anchor's
  own token) and tokens/s; ``identical`` says whether every output equals greedy's;
- parallel, per K: L tokens per K loops at temperature 1, tokens/s, the generative
  perplexity of the samples under a judge (a dense run's, or by default the run's own anchor
  head) and distinct-2; ``anchor_sampled`` is the same for the anchor head's own samples.
Times are wall-clock on the machine that runs it (single process; note its load and CPU model beside them).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..data.storage import load_tokens
from ..readouts import drafting
from ..readouts.generation import generate
from ..readouts.quality import distinct_n, judge_perplexity
from ..runs.folder import load_model, run_data_dir
from ..sampling import anchor_sampler


def bench_prompts(run, count: int, length: int) -> list[list[int]]:
    tokens = load_tokens(run_data_dir(run), "test")
    starts = np.linspace(0, len(tokens) - length - 1, count).round().astype(int)
    return [[int(t) for t in tokens[start:start + length]] for start in starts]


def _timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


@torch.no_grad()
def run_decode_bench(run, loops, prompts: int = 4, prompt_tokens: int = 16, tokens: int = 64, judge=None,
                     seed: int = 0, device="cpu") -> dict:
    model, _ = load_model(run, device)
    anchor = anchor_sampler(model)  # refuses a run without an anchor head
    # the judge: another run read by its own sampler, or this model's anchor head
    judge_model, judge_sampler = (load_model(judge, device)[0], None) if judge else (model, anchor)
    prompt_list = bench_prompts(run, prompts, prompt_tokens)
    greedy, greedy_seconds = _timed(lambda: [generate(model, p, tokens, 1, temperature=0, sampler=anchor)
                                             for p in prompt_list])
    total = prompts * tokens
    report = {"accepted": {}, "tokens_per_verification": {}, "tokens_per_s": {},
              "greedy_tokens_per_s": total / greedy_seconds, "identical": True,
              "parallel": {"tokens_per_s": {}, "gen_ppl": {}, "distinct2": {}}}
    for num_loops in loops:
        key = str(num_loops)
        runs, seconds = _timed(lambda: [drafting.speculative_generate(model, p, tokens, num_loops, seed=seed)
                                        for p in prompt_list])
        accepted = [count for _, stats in runs for count in stats["accepted"]]
        report["identical"] = report["identical"] and all(out == ref for (out, _), ref in zip(runs, greedy))
        report["accepted"][key] = float(np.mean(accepted)) if accepted else 0.0
        report["tokens_per_verification"][key] = total / max(1, sum(stats["verifications"] for _, stats in runs))
        report["tokens_per_s"][key] = total / seconds
        samples, seconds = _timed(lambda: [drafting.parallel_generate(model, p, tokens, num_loops, seed=seed + i)
                                           for i, p in enumerate(prompt_list)])
        report["parallel"]["tokens_per_s"][key] = total / seconds
        report["parallel"]["gen_ppl"][key] = _judged(judge_model, judge_sampler, prompt_list, samples, seed)
        report["parallel"]["distinct2"][key] = distinct_n(samples, 2)
    sampled = [generate(model, p, tokens, 1, temperature=1.0, seed=seed + i, sampler=anchor)
               for i, p in enumerate(prompt_list)]
    report["anchor_sampled"] = {"gen_ppl": _judged(judge_model, judge_sampler, prompt_list, sampled, seed),
                                "distinct2": distinct_n(sampled, 2)}
    report["speedup"] = {k: v / report["greedy_tokens_per_s"] for k, v in report["tokens_per_s"].items()}
    report.update(draft_width=model.draft_width, prompts=prompts, prompt_tokens=prompt_tokens, tokens=tokens,
                  judge=judge or "anchor head of the run", seed=seed, device=str(device))
    return report


def _judged(judge, sampler, prompts, samples, seed) -> float:
    """Generative perplexity of all samples together (token-weighted over the prompts)."""
    import math

    nats = sum(math.log(judge_perplexity(judge, p, [s], seed, sampler)) * len(s) for p, s in zip(prompts, samples))
    return math.exp(nats / max(1, sum(len(s) for s in samples)))


def format_decode_table(report: dict) -> str:
    lines = ["| K | accepted / verification | tokens / verification | spec tokens/s | x greedy | "
             "parallel tokens/s | parallel gen ppl | parallel distinct-2 |", "|---|---|---|---|---|---|---|---|"]
    parallel = report["parallel"]
    for key in report["accepted"]:
        lines.append(f"| {key} | {report['accepted'][key]:.2f} | {report['tokens_per_verification'][key]:.2f} | "
                     f"{report['tokens_per_s'][key]:.1f} | {report['speedup'][key]:.2f} | "
                     f"{parallel['tokens_per_s'][key]:.1f} | {parallel['gen_ppl'][key]:.1f} | "
                     f"{parallel['distinct2'][key]:.3f} |")
    lines.append(f"greedy (anchor) {report['greedy_tokens_per_s']:.1f} tokens/s; speculative identical to greedy: "
                 f"{report['identical']}; anchor samples (T=1): gen ppl {report['anchor_sampled']['gen_ppl']:.1f}, "
                 f"distinct-2 {report['anchor_sampled']['distinct2']:.3f}; judge: {report['judge']}")
    return "\n".join(lines)


def plot_decode_reports(reports: dict[str, dict], out_dir) -> list:
    """PNGs against K of `bench decode` reports (name -> report; several runs, e.g. seeds, on one
    figure): accepted drafts per verification, tokens/s (speculative, with each run's greedy
    tokens/s as a line), and the parallel samples' judge perplexity (each run's anchor samples
    as a line)."""
    from pathlib import Path

    from .plots import plot_against_loops

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def curves(pick):
        return {name: {int(k): v for k, v in pick(report).items()} for name, report in reports.items()}

    return [
        plot_against_loops(curves(lambda r: r["accepted"]), out_dir / "acceptance_vs_loops.png",
                           "accepted drafts per verification", title="self-speculative decoding"),
        plot_against_loops(curves(lambda r: r["tokens_per_s"]), out_dir / "tokens_per_s_vs_loops.png",
                           "speculative tokens/s", title="speculative vs greedy decoding",
                           reference={f"{name} greedy": r["greedy_tokens_per_s"] for name, r in reports.items()}),
        plot_against_loops(curves(lambda r: r["parallel"]["gen_ppl"]), out_dir / "parallel_gen_ppl_vs_loops.png",
                           "judge perplexity of parallel samples", title="parallel decoding (L tokens per K loops)",
                           reference={f"{name} anchor T=1": r["anchor_sampled"]["gen_ppl"]
                                      for name, r in reports.items()}),
    ]
