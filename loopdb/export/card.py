"""The model card (README.md) of an exported run: what the model is, its data, training and scores per K."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.storage import load_tokenizer
from ..runs.folder import run_data_dir

OBJECTIVES = {
    "diffusion": "DiffusionBlocks: a loop is one step of an EDM sampler whose denoiser is the looped core, "
                 "on a sigma grid computed from the loop count K",
    "bptt": "truncated backpropagation through a random number of loops (Huginn): a loop is one recurrent "
            "iteration from a random initial state",
    "ouro": "every loop's loss weighted by a learned exit distribution (Ouro): a loop is one recurrent "
            "iteration from a random initial state",
    "dense": "the same layers applied once as a plain causal transformer (the loop count is ignored)",
    "joint": "sequence-joint DiffusionBlocks: a loop is one step of an EDM sampler whose denoiser is the looped "
             "core over every position's noisy state at once, with a sigma per position (a wavefront of width "
             "`wavefront` lets earlier positions run ahead), trained in one pass per step",
}


def _last_scores(run_dir: Path) -> tuple:
    """The last validation record of the run's metrics.jsonl: its step and {metric: {K: value}}
    (bits per byte for a text run, accuracies for a task run)."""
    path = run_dir / "metrics.jsonl"
    step, scores = None, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found = {}
            for key, value in record.items():
                if key.startswith("val/") and "@" in key and isinstance(value, (int, float)):
                    metric, loops = key[len("val/"):].split("@", 1)
                    found.setdefault(metric, {})[int(loops)] = value
            if found:
                step, scores = record.get("step"), found
    return step, scores


def _span(values) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _score_table(scores: dict) -> str:
    metrics = sorted(scores)
    loops = sorted({k for values in scores.values() for k in values})
    rows = [f"| K | {' | '.join(metrics)} |", "|---" * (len(metrics) + 1) + "|"]
    for k in loops:
        cells = [f"{scores[m][k]:.4f}" if k in scores[m] else "" for m in metrics]
        rows.append(f"| {k} | {' | '.join(cells)} |")
    return "\n".join(rows)


def model_card(run_dir, config, values: dict, parameters: int, out: Path) -> str:
    run_dir = Path(run_dir)
    m, t = config.model, config.train
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    step, scores = _last_scores(run_dir)
    data_dir = run_data_dir(run_dir)
    if t.task:
        data = (f"The reasoning task `{t.task}` of loopdb.tasks (examples generated on the fly from the step's seed), "
                f"difficulties {_span(t.train_difficulties)} in training; its word tokenizer "
                f"({m.vocab_size} words) from `{data_dir}`.")
    else:
        data = (f"Tokens of the prepared corpus in `{data_dir}` ({m.vocab_size}-entry tokenizer); loopdb's default "
                "corpus is the plays of Shakespeare with Julius Caesar held out for validation and Macbeth for test.")
    measured = "accuracy on generated examples" if t.task else "bits per byte"
    # a prompt the tokenizer can encode, and tasks of eval/tasks the model can take
    prompt = "".join(" " + word for word in load_tokenizer(data_dir).words[1:4]) if t.task else "To be, or not"
    tasks = f"{t.task}_seed1000_d2-12" if t.task else "shakespeare_bpb,shakespeare_cloze"
    loops = values["num_loops"]
    joint = t.objective == "diffusion" and values["recurrence"] == "sequence"
    drafting = (f" Drafting: a loop denoises the {m.draft_width} noisy slots of a position jointly (slot j "
                f"predicts token t+1+j); the next token is slot 0." if m.draft_width > 1 else "")
    anchor = ", or `anchor` (the trained dense anchor head: the clean stream's next-token distribution)" \
        if values["anchor_head"] else ""
    if m.family == "stacked":
        title = f"loopdb stacked DiffusionBlocks language model ({t.objective})"
        what = (f"A stack of {m.n_layers} distinct layers in {m.num_blocks} DiffusionBlocks trained with loopdb: each block "
                f"is the denoiser of its own noise range, and a sampler step of K (chosen per call) runs the block\n"
                f"owning its noise level (K = {m.num_blocks} runs each block once)")
    else:
        kind = "sequence-joint DiffusionBlocks" if joint else f"{t.objective}, {values['recurrence']} recurrence"
        title = f"loopdb looped language model ({kind})"
        what = (f"A looped (recurrent-depth) transformer trained with loopdb: a prelude of {m.n_prelude} layer(s), a core "
                f"of\n{m.n_core} layer(s) applied K times (the loop count, chosen per call), a coda of {m.n_coda} layer(s)")
    return f"""---
library_name: transformers
tags: [loopdb, looped-transformer, recurrent-depth]
---
# {title}

{what};
d_model {m.d_model}, {m.n_heads} heads, a window of {m.context} tokens, {parameters:,} parameters.
Training objective: {OBJECTIVES["joint" if joint else t.objective]}.{drafting}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out.name}", trust_remote_code=True, num_loops={loops})
tokenizer = AutoTokenizer.from_pretrained("{out.name}")
ids = tokenizer("{prompt}", return_tensors="pt").input_ids
logits = model(ids, num_loops={loops}).logits            # log-probabilities (readout="predictive")
new = model.generate(ids, max_new_tokens=32, num_loops={loops})
print(tokenizer.decode(new[0], skip_special_tokens=False))
```

- The tokenizer is a plain tokenizers BPE (no custom code); transformers still reads `config.json` when it
  loads, so an interactive prompt may ask about the model's code: answer N, or pass `trust_remote_code=True`.
- `num_loops` (default {loops}): loops per call; an argument of `forward` and `generate`, and a config field
  that `from_pretrained(..., num_loops=K)` overrides.
- `noise_seed` (default {values.get('noise_seed', 0)}): the seed of the initial states; each row of a batch
  draws from its own generator seeded by it, so a call is reproducible and a row does not depend on the batch.
- `readout`: `predictive` (default: log of the mean over `num_samples` draws of the last loop's distribution)
  or `draw` (one draw's raw logits){anchor}.
- `output_hidden_states=True`: the prelude output, then the state after each loop; with
  `generate(..., return_dict_in_generate=True)` the same for each new token.
- `generate`: left-padded batches (pass `attention_mask`), greedy or `do_sample=True` with `temperature` and
  `top_k`; a key/value cache (`LoopDBCache`, a transformers `DynamicCache` with one slot per layer, and per
  loop and layer of the core when every loop attends over the sequence). Rows decode together (as loopdb's
  `generate_batch`: when the window fills it slides for every row) or, with sequence recurrence, one after another
  (then `exit="kl:5e-4"` stops a token's loops early, and `last_loop_cache=True` keeps one cache set of each
  position's last loop).
  The newline is the beginning/end-of-text token but not a stop token; decode with `skip_special_tokens=False`
  to keep newlines.

Evaluate with lm-evaluation-harness at any loop count:

```bash
lm_eval --model hf --model_args pretrained={out.name},trust_remote_code=True,num_loops={loops} \\
    --tasks {tasks} --include_path eval/tasks
```

## Data

{data}

## Training

{t.max_steps} steps of batch {t.batch_size} x {m.context} tokens, learning rate {t.lr}, seed {t.seed}
({summary.get('train_seconds', float('nan')):.0f} s of training; `config.json` in the run folder holds every setting).

## Scores

Validation {measured} by loop count K at step {step} (loopdb's predictive readout,
{t.eval_samples} noise draw(s)), from the run's `metrics.jsonl`:

{_score_table(scores) if scores else "(no validation record)"}
"""
