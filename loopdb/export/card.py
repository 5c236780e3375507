"""The model card (README.md) of an exported run: what the model is, its data, training and scores per K."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.folder import run_data_dir

OBJECTIVES = {
    "diffusion": "DiffusionBlocks: a loop is one step of an EDM sampler whose denoiser is the looped core, "
                 "on a sigma grid computed from the loop count K",
    "bptt": "truncated backpropagation through a random number of loops (Huginn): a loop is one recurrent "
            "iteration from a random initial state",
    "ouro": "every loop's loss weighted by a learned exit distribution (Ouro): a loop is one recurrent "
            "iteration from a random initial state",
    "dense": "the same layers applied once as a plain causal transformer (the loop count is ignored)",
}


def _last_scores(run_dir: Path) -> dict:
    """The last validation bits per byte per K in the run's metrics.jsonl, and its step."""
    path = run_dir / "metrics.jsonl"
    scores, step = {}, None
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found = {key.split("@")[1]: value for key, value in record.items() if key.startswith("val/bpb@")}
            if found:
                scores, step = found, record.get("step")
    return {"step": step, "bpb": scores}


def model_card(run_dir, config, values: dict, parameters: int, out: Path) -> str:
    run_dir = Path(run_dir)
    m, t = config.model, config.train
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    scores = _last_scores(run_dir)
    data_dir = run_data_dir(run_dir)
    table = "\n".join(f"| {loops} | {value:.4f} |" for loops, value in sorted(scores["bpb"].items(), key=lambda kv: int(kv[0])))
    loops = values["num_loops"]
    if m.family == "stacked":
        title = f"loopdb stacked DiffusionBlocks language model ({t.objective})"
        what = (f"A stack of {m.n_layers} distinct layers in {m.num_blocks} DiffusionBlocks trained with loopdb: each block "
                f"is the denoiser of its own noise range, and a sampler step of K (chosen per call) runs the block\n"
                f"owning its noise level (K = {m.num_blocks} runs each block once)")
    else:
        title = f"loopdb looped language model ({t.objective}, {values['recurrence']} recurrence)"
        what = (f"A looped (recurrent-depth) transformer trained with loopdb: a prelude of {m.n_prelude} layer(s), a core "
                f"of\n{m.n_core} layer(s) applied K times (the loop count, chosen per call), a coda of {m.n_coda} layer(s)")
    return f"""---
library_name: transformers
tags: [loopdb, looped-transformer, recurrent-depth]
---
# {title}

{what};
d_model {m.d_model}, {m.n_heads} heads, a window of {m.context} tokens, {parameters:,} parameters.
Training objective: {OBJECTIVES[t.objective]}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out.name}", trust_remote_code=True, num_loops={loops})
tokenizer = AutoTokenizer.from_pretrained("{out.name}")
ids = tokenizer("To be, or not", return_tensors="pt").input_ids
logits = model(ids, num_loops={loops}).logits            # log-probabilities (readout="predictive")
new = model.generate(ids, max_new_tokens=32, num_loops={loops})
print(tokenizer.decode(new[0], skip_special_tokens=False))
```

- `num_loops` (default {loops}): loops per call; an argument of `forward` and `generate`, and a config field
  that `from_pretrained(..., num_loops=K)` overrides.
- `noise_seed` (default {values.get('noise_seed', 0)}): the seed of the initial states; each row of a batch
  draws from its own generator seeded by it, so a call is reproducible and a row does not depend on the batch.
- `readout`: `predictive` (default: log of the mean over `num_samples` draws of the last loop's distribution)
  or `draw` (one draw's raw logits).
- `output_hidden_states=True`: the prelude output, then the state after each loop.
- `generate`: left-padded batches (pass `attention_mask`), greedy or `do_sample=True` with `temperature` and
  `top_k`; a key/value cache (`LoopDBCache`, a transformers `DynamicCache` with one slot per layer, and per
  loop and layer of the core when every loop attends over the sequence); rows are decoded one after another.
  The newline is the beginning/end-of-text token but not a stop token; decode with `skip_special_tokens=False`
  to keep newlines.

Evaluate with lm-evaluation-harness at any loop count:

```bash
lm_eval --model hf --model_args pretrained={out.name},trust_remote_code=True,num_loops={loops} \\
    --tasks shakespeare_bpb,shakespeare_cloze --include_path eval/tasks
```

## Data

Tokens of the prepared corpus in `{data_dir}` ({m.vocab_size} sentencepiece BPE pieces, byte fallback);
loopdb's default corpus is the plays of Shakespeare with Julius Caesar held out for validation and
Macbeth for test.

## Training

{t.max_steps} steps of batch {t.batch_size} x {m.context} tokens, learning rate {t.lr}, seed {t.seed}
({summary.get('train_seconds', float('nan')):.0f} s of training; `{run_dir.name}/config.json` in the run folder holds
every setting).

## Scores

Validation bits per byte by loop count K at step {scores['step']} (loopdb's predictive readout,
{t.eval_samples} noise draw(s), {t.eval_windows} windows):

| K | bits per byte |
|---|---|
{table}
"""
