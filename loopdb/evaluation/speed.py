"""``loopdb bench speed``: training and generation speed of the looped LM against a plain GPT.

Training. Every member takes a full step (forward, backward, AdamW) on random tokens at
the same dims: ``reference`` (loopdb.models.reference_gpt, nanoGPT-shaped) and the looped
LM under its three objectives, ``dense``, ``diffusion`` and ``bptt`` (fixed depth r_bar,
gradients through the last k, so every step does the same arithmetic). The members run
INTERLEAVED in one process, round after round, so a neighbour's load on a shared machine
slows all of them alike; the ratios are the numbers to read, the milliseconds are context.
A member's time is the FASTEST of its rounds: a neighbour's load only ever adds time.

FLOPs are counted explicitly (``training_flops``): 2 per multiply-add of every matmul the
step runs; attention as 4 * Tq * Tk * d per layer for every (query, key) pair handed to the
kernel (masked pairs included, causal ones too, as nanoGPT counts them); backward = 2 x
forward for the parts that get gradients. Elementwise work, norms and the optimizer are not
counted. ``fraction_of_peak`` divides the achieved FLOP/s by the best FLOP/s of a plain
square matmul measured in the same process, same precision, before and in every round.

Generation: tokens/s of the diffusion looped LM (untrained: speed does not depend on the
weights) with and without the clean-stream cache, after a prompt of ``--gen-context``
tokens, at K = 1 and 16 loops, for batch 1 and 8 (batched generation, loopdb.readouts.generation).
The ratios compare DECODING speed: the cache's first pass over the prompt (``prefill_ms``) is
reported apart, as inference engines report prompt and generation speed apart; the ``_with_prefill``
ratios are over whole calls. Uncached, every token recomputes the context: no prefill to leave out.

The process keeps freed memory (loopdb.device.keep_freed_memory), as the trainer does on the CPU.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from ..device import keep_freed_memory


@dataclass
class SpeedDims:
    d_model: int = 256
    n_layers: int = 4        # looped LM: 1 prelude + (n_layers - 2) core + 1 coda
    context: int = 256
    batch_size: int = 16
    vocab_size: int = 4096
    head_dim: int = 64
    mean_depth: int = 32     # bptt r_bar (fixed depth here)
    backprop_depth: int = 8  # bptt k


OBJECTIVES = ("dense", "diffusion", "bptt")
MEMBERS = ("reference", *OBJECTIVES)


# -- FLOP counts -------------------------------------------------------------------------------
def _layer_flops(tokens: int, keys: int, dim: int) -> int:
    """Forward FLOPs of one transformer layer for ``tokens`` query rows attending ``keys`` keys each."""
    projections = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim)  # qkv, out, MLP (4d)
    return projections + 4 * tokens * keys * dim  # QK^T and AV


def training_flops(member: str, dims: SpeedDims) -> int:
    """FLOPs of one training step of ``member`` (see the module docstring for what is counted)."""
    B, T, d, V = dims.batch_size, dims.context, dims.d_model, dims.vocab_size
    tokens = B * T
    n_core = dims.n_layers - 2
    head = 2 * tokens * d * V
    modulation = 2 * B * d * 6 * d * n_core  # the core's adaLN on one conditioning vector per row
    clean = dims.n_layers * _layer_flops(tokens, T, d) + modulation
    if member == "reference":
        return 3 * (dims.n_layers * _layer_flops(tokens, T, d) + head)
    if member == "dense":
        return 3 * (clean + head)
    injection = 2 * tokens * 2 * d * d
    noisy_keys = 2 * T  # [clean keys ; the noisy rows' own], masked to the causal clean ones and itself
    core_pass = injection + n_core * _layer_flops(tokens, noisy_keys, d) + modulation
    coda_and_head = _layer_flops(tokens, noisy_keys, d) + head
    if member == "diffusion":
        sigma_embedder = 2 * B * (256 * d + d * d)
        return 3 * (clean + sigma_embedder + core_pass + 2 * tokens * d * d + coda_and_head)
    if member == "bptt":
        without_grad = max(0, dims.mean_depth - dims.backprop_depth)
        with_grad = dims.mean_depth - without_grad
        return 3 * clean + without_grad * core_pass + 3 * with_grad * core_pass + 3 * coda_and_head
    raise ValueError(f"unknown member {member!r}; choose one of {', '.join(MEMBERS)}")


# -- members -------------------------------------------------------------------------------------
def _looped_config(dims: SpeedDims, objective: str, context: int | None = None):
    from ..config import Config
    from ..families import check_config

    config = Config()
    m, t = config.model, config.train
    m.family, m.vocab_size, m.context, m.d_model = "looped", dims.vocab_size, context or dims.context, dims.d_model
    m.n_heads, m.n_prelude, m.n_core, m.n_coda = dims.d_model // dims.head_dim, 1, dims.n_layers - 2, 1
    t.objective, t.batch_size = objective, dims.batch_size
    t.mean_depth, t.backprop_depth, t.depth_sampler = dims.mean_depth, dims.backprop_depth, "fixed"
    return check_config(config)


def build_member(member: str, dims: SpeedDims, compile: bool = False):
    """(module, step_loss(batch, generator) -> loss) for one member; batch (B, T+1)."""
    from ..families import build_model, family_of
    from ..models.reference_gpt import ReferenceGPT

    torch.manual_seed(0)
    if member == "reference":
        model = ReferenceGPT(dims.vocab_size, dims.d_model, dims.n_layers, dims.d_model // dims.head_dim, dims.context)
        forward = torch.compile(model) if compile else model
        return model, lambda batch, generator: forward(batch[:, :-1], batch[:, 1:])
    config = _looped_config(dims, member)
    model, objective = build_model(config), family_of(config).objective(config)
    if not compile:
        return model, lambda batch, generator: objective.loss(model, batch, generator)[0]
    # compile the whole loss of the objective (as the trainer's compiled model would see it)
    compiled = torch.compile(lambda batch, generator: objective.loss(model, batch, generator)[0])
    return model, compiled


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# -- matmul peak -----------------------------------------------------------------------------------
def matmul_peak(precision: str, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) matmul at ``precision`` (fp32, or bf16 operands)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


# -- training speed ----------------------------------------------------------------------------------
def measure_training(dims: SpeedDims, precisions=("fp32", "bf16"), compile_modes=(False,), rounds: int = 5,
                     warmup: int = 2, members=MEMBERS, peaks: dict | None = None) -> list[dict]:
    """Fastest step time of every (member, precision, compile) over ``rounds`` interleaved rounds.
    ``peaks`` (precision -> GFLOP/s), if given, is raised by a matmul measured in every round, so
    the peak sees the same load as the members."""
    from ..training.trainer import make_optimizer

    entries = []
    for compile in compile_modes:
        for member in members:
            model, step_loss = build_member(member, dims, compile)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if member == "reference" else \
                make_optimizer(model, _looped_config(dims, member))
            for precision in precisions:
                entries.append({"member": member, "precision": precision, "compile": compile, "model": model,
                                "step_loss": step_loss, "optimizer": optimizer, "seconds": []})
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(dims.vocab_size, (dims.batch_size, dims.context + 1), generator=generator)

    def one_step(entry):
        step_generator = torch.Generator().manual_seed(1)  # the same noise / sigmas every step
        started = time.perf_counter()
        with _autocast(entry["precision"]):
            loss = entry["step_loss"](batch, step_generator)
        loss.backward()
        entry["optimizer"].step()
        entry["optimizer"].zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for entry in entries:
        for _ in range(warmup):
            one_step(entry)
    for _ in range(rounds):
        for entry in entries:
            entry["seconds"].append(one_step(entry))
        for precision in peaks or ():
            peaks[precision] = max(peaks[precision], matmul_peak(precision, repeats=1))
    results = []
    for entry in entries:
        seconds = min(entry["seconds"])
        flops = training_flops(entry["member"], dims)
        results.append({"member": entry["member"], "precision": entry["precision"], "compile": entry["compile"],
                        "ms_per_step": 1000 * seconds, "ms_rounds": [round(1000 * s, 1) for s in entry["seconds"]],
                        "tokens_per_s": dims.batch_size * dims.context / seconds,
                        "gflop_per_step": flops / 1e9, "gflop_per_s": flops / seconds / 1e9})
    return results


# -- generation speed ------------------------------------------------------------------------------------
def measure_generation(dims: SpeedDims, prompt_length: int = 512, new_tokens: int = 16, loops=(1, 16),
                       batches=(1, 8), rounds: int = 3, precision: str = "fp32") -> list[dict]:
    """Tokens/s of batched generation with and without the cache, interleaved over ``rounds``:
    ``tokens_per_s`` over the whole call, ``decode_tokens_per_s`` once the prompt is in the cache
    (the cache's first pass, ``prefill_ms``, left out; without the cache every token recomputes the
    context, so both are the same), each from its fastest round."""
    from ..families import build_model
    from ..readouts.generation import generate_batch

    model = build_model(_looped_config(dims, "diffusion", context=prompt_length + new_tokens)).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(dims.vocab_size, (max(batches), prompt_length), generator=generator).tolist()
    cases = [{"num_loops": k, "batch": b, "cache": cache, "seconds": [], "prefill": []}
             for k in loops for b in batches for cache in (True, False)]
    for _ in range(rounds):
        for case in cases:
            stats = {}
            started = time.perf_counter()
            with _autocast(precision):
                generate_batch(model, prompts[:case["batch"]], new_tokens, case["num_loops"], temperature=0.0,
                               use_cache=case["cache"], stats=stats)
            case["seconds"].append(time.perf_counter() - started)
            case["prefill"].append(stats["prefill_seconds"])
    rows = []
    for c in cases:
        tokens = c["batch"] * new_tokens
        decode = min(total - prefill for total, prefill in zip(c["seconds"], c["prefill"]))
        rows.append({"num_loops": c["num_loops"], "batch": c["batch"], "cache": c["cache"], "precision": precision,
                     "prompt_length": prompt_length, "new_tokens": new_tokens,
                     "tokens_per_s": tokens / min(c["seconds"]), "decode_tokens_per_s": tokens / decode,
                     "prefill_ms": 1000 * min(c["prefill"]) if c["cache"] else 0.0})
    return rows


# -- the report ------------------------------------------------------------------------------------------
def _find(rows, **keys):
    return next(row for row in rows if all(row[k] == v for k, v in keys.items()))


def run_speed_bench(dims: SpeedDims | None = None, compile: bool = False, rounds: int = 5,
                    generation: bool = True, gen_context: int = 512, gen_rounds: int = 3,
                    keep_memory: bool = True) -> dict:
    """``keep_memory=False`` leaves glibc's default allocator: every step page-faults its large
    activations back in (what that costs is the difference between the two runs)."""
    dims = dims or SpeedDims()
    kept = keep_memory and keep_freed_memory()  # as the trainer does on the CPU: every member alike
    peaks = {precision: matmul_peak(precision) for precision in ("fp32", "bf16")}
    compile_modes = (False, True) if compile else (False,)
    training = measure_training(dims, compile_modes=compile_modes, rounds=rounds, peaks=peaks)
    for row in training:
        row["fraction_of_peak"] = row["gflop_per_s"] / peaks[row["precision"]]
    ratios, fraction_of_peak = {}, {}
    for compiled in compile_modes:
        suffix = "_compiled" if compiled else ""
        for precision in ("fp32", "bf16"):
            reference = _find(training, member="reference", precision=precision, compile=compiled)
            dense = _find(training, member="dense", precision=precision, compile=compiled)
            ratios[f"dense_vs_reference_{precision}{suffix}"] = dense["ms_per_step"] / reference["ms_per_step"]
            # the same ratio round by round (members of one round ran back to back): its median says
            # how far the fastest-round ratio above is the typical one on a machine with neighbours
            paired = [d / r for d, r in zip(dense["ms_rounds"], reference["ms_rounds"])]
            ratios[f"dense_vs_reference_{precision}{suffix}_median_round"] = statistics.median(paired)
            for objective in ("diffusion", "bptt"):
                row = _find(training, member=objective, precision=precision, compile=compiled)
                ratios[f"{objective}_vs_dense_step_{precision}{suffix}"] = row["ms_per_step"] / dense["ms_per_step"]
                ratios[f"{objective}_vs_dense_flops_per_s_{precision}{suffix}"] = row["gflop_per_s"] / dense["gflop_per_s"]
            for member in MEMBERS:
                row = _find(training, member=member, precision=precision, compile=compiled)
                fraction_of_peak[f"{member}_{precision}{suffix}"] = row["fraction_of_peak"]
    report = {"dims": asdict(dims), "threads": torch.get_num_threads(), "keep_freed_memory": kept,
              "matmul_peak_gflop_per_s": peaks, "training": training,
              "ratios": ratios, "fraction_of_peak": fraction_of_peak}
    if generation:
        rows = measure_generation(dims, prompt_length=gen_context, rounds=gen_rounds)
        # keyed by case: "k16_batch8_cached" -> that case's row
        report["generation"] = {
            f"k{row['num_loops']}_batch{row['batch']}_{'cached' if row['cache'] else 'uncached'}": row for row in rows}
        for k in (1, 16):  # decoding speed; "_with_prefill": over the whole call, the prompt's pass included
            for measure, suffix in (("decode_tokens_per_s", ""), ("tokens_per_s", "_with_prefill")):
                cached = _find(rows, num_loops=k, batch=1, cache=True)[measure]
                uncached = _find(rows, num_loops=k, batch=1, cache=False)[measure]
                batch8 = _find(rows, num_loops=k, batch=8, cache=True)[measure]
                ratios[f"cached_vs_uncached_k{k}_ctx{gen_context}{suffix}"] = cached / uncached
                ratios[f"batch8_vs_batch1_cached_k{k}{suffix}"] = batch8 / cached
    report["ratios"] = {key: round(value, 3) for key, value in ratios.items()}
    report["fraction_of_peak"] = {key: round(value, 3) for key, value in fraction_of_peak.items()}
    return report


def format_table(report: dict) -> str:
    dims = report["dims"]
    peaks = report["matmul_peak_gflop_per_s"]
    lines = [f"dims: d={dims['d_model']}, {dims['n_layers']} layers, T={dims['context']}, batch {dims['batch_size']}, "
             f"vocab {dims['vocab_size']}; {report['threads']} threads; matmul peak fp32 {peaks['fp32']:.0f}, "
             f"bf16 {peaks['bf16']:.0f} GFLOP/s",
             "| member | precision | compile | ms/step | tokens/s | GFLOP/step | GFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["training"]:
        lines.append(f"| {row['member']} | {row['precision']} | {'on' if row['compile'] else 'off'} | "
                     f"{row['ms_per_step']:.1f} | {row['tokens_per_s']:.0f} | {row['gflop_per_step']:.2f} | "
                     f"{row['gflop_per_s']:.1f} | {row['fraction_of_peak']:.3f} |")
    if "generation" in report:
        lines += ["", "| generation K | batch | cache | prefill ms | decode tokens/s | tokens/s with prefill |",
                  "|---|---|---|---|---|---|"]
        for row in report["generation"].values():
            lines.append(f"| {row['num_loops']} | {row['batch']} | {'on' if row['cache'] else 'off'} | "
                         f"{row['prefill_ms']:.0f} | {row['decode_tokens_per_s']:.1f} | {row['tokens_per_s']:.1f} |")
    lines += [""] + [f"{key}: {value:.3f}" for key, value in report["ratios"].items()]
    return "\n".join(lines)
