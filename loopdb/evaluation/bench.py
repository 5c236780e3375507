"""``loopdb bench memory``: peak memory of a few training steps of the same stacked LM,
trained end to end or block-wise (docs/method.md#pitfall-8: a measurement, against a baseline
with activation checkpointing too).

Each configuration runs in its OWN process (a fresh ``python -m loopdb.evaluation.bench``), so
peaks do not mix. On CPU the peak is the resident-set high-water mark
(``ru_maxrss``); ``peak_mb`` is that absolute number, ``baseline_mb`` the same mark
after imports (torch alone), and ``above_baseline_mb`` their difference. On CUDA it
is the allocator's peak (``torch.cuda.max_memory_allocated``). A DiffusionBlocks
process trains block 0 only: it allocates that block's weights, gradients and AdamW
state and nothing of the other blocks (``held_blocks``), as one rank of
``--block-parallel`` does. Batches are random tokens: memory does not depend on the text.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

# the bench model: many wide layers and a small vocabulary, so the layers dominate the shared parts
BENCH_MODEL = {"vocab_size": 256, "context": 64, "d_model": 768, "n_heads": 12, "n_layers": 16}
BENCH_BATCH = 4
BENCH_STEPS = 2  # the second step holds the full AdamW state and the activations: the peak

CONFIGS = {  # name -> (objective, num_blocks, activation checkpointing)
    "e2e": ("dense", 4, False),
    "e2e_checkpointed": ("dense", 4, True),
    "diffusion_b2": ("diffusion", 2, False),
    "diffusion_b4": ("diffusion", 4, False),
    "diffusion_b4_checkpointed": ("diffusion", 4, True),
}
RATIOS = {"diffusion_b4_vs_e2e": ("diffusion_b4", "e2e"), "diffusion_b2_vs_e2e": ("diffusion_b2", "e2e"),
          "diffusion_b4_vs_e2e_checkpointed": ("diffusion_b4", "e2e_checkpointed")}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name: str, device: str = "cpu", model_keys: dict | None = None) -> dict:
    """Run the configuration ``name`` in THIS process and return its numbers
    (``model_keys`` replaces BENCH_MODEL, e.g. a tiny model for the tests)."""
    import torch

    from ..config import Config, ModelConfig
    from ..families.text import STACKED, build_stacked
    from ..training.trainer import make_optimizer, step_generator

    baseline = _rss_mb()
    objective, num_blocks, checkpointing = CONFIGS[name]
    config = Config()
    config.model = ModelConfig(family="stacked", num_blocks=num_blocks, **(model_keys or BENCH_MODEL))
    config.train.objective, config.train.checkpointing = objective, checkpointing
    config.train.batch_size = BENCH_BATCH
    trained_blocks = (0,) if objective == "diffusion" else None
    config.train.train_blocks = trained_blocks or ()
    config.validate()
    torch.manual_seed(0)
    model = build_stacked(config, held_blocks=trained_blocks).to(device).train()
    objective = STACKED.objective(config)
    optimizer = make_optimizer(model, config)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(BENCH_STEPS):
        generator = step_generator(0, step)
        batch = torch.randint(config.model.vocab_size, (BENCH_BATCH, config.model.context + 1), generator=generator)
        loss, _ = objective.loss(model, batch.to(device), generator, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    held = sum(p.numel() for p in model.parameters() if not p.is_meta)
    trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    result = {"name": name, "objective": objective, "num_blocks": num_blocks, "checkpointing": checkpointing,
              "trained_blocks": list(trained_blocks) if trained_blocks else "all", "device": device,
              "parameters_held": held, "parameters_trained": trained, "steps": BENCH_STEPS,
              "seconds": round(seconds, 2)}
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(peak_mb=round(peak, 1), measure="cuda max_memory_allocated")
    else:
        peak = _rss_mb()
        result.update(peak_mb=round(peak, 1), baseline_mb=round(baseline, 1),
                      above_baseline_mb=round(peak - baseline, 1), measure="ru_maxrss")
    return result


def run_memory_bench(device: str = "cpu", model_keys: dict | None = None) -> dict:
    """Every configuration in its own subprocess; returns {"configs": [...], "ratios": {...}}."""
    model_keys = model_keys or BENCH_MODEL
    configs = []
    for name in CONFIGS:
        output = subprocess.run([sys.executable, "-m", "loopdb.evaluation.bench", name, device, json.dumps(model_keys)],
                                check=True, capture_output=True, text=True).stdout
        configs.append(json.loads(output.strip().splitlines()[-1]))
    by_name = {c["name"]: c for c in configs}
    ratios = {key: round(by_name[a]["peak_mb"] / by_name[b]["peak_mb"], 3) for key, (a, b) in RATIOS.items()}
    report = {"configs": configs, "ratios": ratios, "model": {**model_keys, "batch_size": BENCH_BATCH}}
    if "above_baseline_mb" in configs[0]:
        report["ratios_above_baseline"] = {
            key: round(by_name[a]["above_baseline_mb"] / by_name[b]["above_baseline_mb"], 3)
            for key, (a, b) in RATIOS.items()}
    return report


def format_table(report: dict) -> str:
    cpu = "above_baseline_mb" in report["configs"][0]
    lines = ["| config | params held | params trained | peak MB | " + ("above baseline MB | " if cpu else "")
             + "s |", "|---|---|---|---|" + ("---|" if cpu else "") + "---|"]
    for c in report["configs"]:
        lines.append(f"| {c['name']} | {c['parameters_held'] / 1e6:.1f}M | {c['parameters_trained'] / 1e6:.1f}M | "
                     f"{c['peak_mb']:.0f} | " + (f"{c['above_baseline_mb']:.0f} | " if cpu else "")
                     + f"{c['seconds']:.1f} |")
    for key, value in report["ratios"].items():
        extra = f" (above baseline {report['ratios_above_baseline'][key]:.3f})" if cpu else ""
        lines.append(f"{key}: {value:.3f}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: python -m loopdb.evaluation.bench NAME [DEVICE [MODEL_KEYS_JSON]]
    print(json.dumps(measure(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu",
                             json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)))
