"""`loopdb export RUN --out DIR`: a run as a transformers model folder.

DIR loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(DIR)`` where loopdb is not installed:

  config.json, hf_configuration.py, hf_layers.py, hf_generation.py, hf_joint.py, hf_modeling.py
                                                    the model code (torch + transformers only), via auto_map
  model.safetensors                                    the run's newest weights, under loopdb's own names
  tokenizer.json, tokenizer_config.json                 the run's sentencepiece BPE as a tokenizers BPE
  generation_config.json, README.md                    greedy decoding defaults; the model card

The hf_*.py files are real modules of this package, copied verbatim.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UsageError
from ..runs.folder import load_model, run_data_dir
from ..families.text import prompt_openers
from .card import model_card
from .tokenizer import newline_id, transformers_tokenizer

HERE = Path(__file__).resolve().parent
CODE_FILES = ("hf_configuration.py", "hf_layers.py", "hf_generation.py", "hf_joint.py", "hf_modeling.py")
AUTO_MAP = {"AutoConfig": "hf_configuration.LoopDBConfig", "AutoModelForCausalLM": "hf_modeling.LoopDBForCausalLM"}
DEFAULT_LOOPS = 4


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError('loopdb export needs transformers; install it with pip install -e ".[hf]"') from None
    return transformers


def hf_config_values(config) -> dict:
    """The LoopDBConfig fields of a run's config, or UsageError for a model the export cannot express."""
    m, d, t = config.model, config.diffusion, config.train
    if m.family not in ("looped", "stacked"):
        raise UsageError(f"loopdb export writes the looped and stacked next-token language models, not family "
                         f"{m.family!r}; score and sample this run with loopdb score and loopdb sample")
    stacked = m.family == "stacked"
    return {
        "family": m.family, "n_layers": m.n_layers, "num_blocks": m.num_blocks, "partition": d.partition,
        "vocab_size": m.vocab_size, "context": m.context, "d_model": m.d_model, "n_heads": m.n_heads,
        "n_prelude": m.n_prelude, "n_core": m.n_core, "n_coda": m.n_coda, "mlp_ratio": m.mlp_ratio,
        "injection": m.injection, "tie_head": m.tie_head, "recurrence": "position" if stacked else config.recurrence,
        "sandwich_norm": m.sandwich_norm, "state_std": m.state_std,
        "embedded_norm": m.embedded_norm, "exit_gate": t.objective == "ouro", "objective": t.objective,
        "sigma_data": d.sigma_data, "target_norm": d.target_norm, "p_mean": d.p_mean, "p_std": d.p_std,
        "sigma_min": d.sigma_min, "sigma_max": d.sigma_max, "grid": d.grid, "grid_sigma_last": d.grid_sigma_last,
        "solver": d.solver, "estimate": d.estimate, "self_condition": d.self_condition,
        "likelihood_logits": d.likelihood_logits, "known_prefix": not t.task, "wavefront": d.wavefront,
        "draft_width": m.draft_width, "anchor_head": t.anchor_weight > 0,
        "prompt_openers": prompt_openers(config) or [], "state_input": d.state_input,
        # K = num_blocks runs each stacked block once (`loopdb sample`'s default)
        "num_loops": 1 if t.objective == "dense" else m.num_blocks if stacked else DEFAULT_LOOPS,
    }


def export_run(run_dir, out, seed: int = 0, samples: int = 4) -> Path:
    """Write the transformers folder of ``run_dir``'s newest checkpoint to ``out``; returns ``out``."""
    transformers = _transformers()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder")
    model, config = load_model(run_dir)
    values = hf_config_values(config)
    data_dir = run_data_dir(run_dir)
    tokenizer = transformers_tokenizer(data_dir, config.model.start_token)
    newline = newline_id(data_dir)
    from .hf_configuration import LoopDBConfig
    from .hf_modeling import LoopDBForCausalLM

    hf_config = LoopDBConfig(**values, noise_seed=seed, num_samples=samples, bos_token_id=newline,
                             eos_token_id=newline, pad_token_id=tokenizer.pad_token_id)
    hf_config.auto_map = dict(AUTO_MAP)
    hf_model = LoopDBForCausalLM(hf_config)
    hf_model.load_state_dict(model.state_dict(), strict=True)  # the same module names as loopdb's model
    # greedy, and the newline is no stop token (it is the text's document separator)
    hf_model.generation_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=64,
                                                               bos_token_id=newline, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    _fix_auto_map(out / "config.json")
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out / name)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(run_dir, config, values, hf_model.num_parameters(), out))
    return out


def _fix_auto_map(path: Path) -> None:
    """config.json names the copied modules (save_pretrained of a class imported from a package may
    write the package path instead)."""
    data = json.loads(path.read_text())
    data["auto_map"] = dict(AUTO_MAP)
    data.pop("architectures", None)
    data["architectures"] = ["LoopDBForCausalLM"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
