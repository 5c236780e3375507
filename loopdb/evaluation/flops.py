"""Training FLOPs per step of the looped LMs: counted over one real trainer step, and computed from the config.

What is counted (both ways, as torch.utils.flop_counter.FlopCounterMode counts): matrix products
only. A linear layer on ``rows`` rows is 2 * rows * fan_in * fan_out forward; its backward the same
again for the weight gradient and again for the input gradient where the input needs one (not for
the sigma embedder's first layer, whose sinusoidal features are constants). Attention is its two
products, 2 * 2 * B * Tq * Tk * d forward as if unmasked (a causal mask halves the useful work;
neither count credits it), and five in the backward, which recomputes the scores (four where at most
FEW_QUERIES rows attend to a cached prefix: loopdb.layers.few_query_attention, plain matmuls). Norms,
activations, the softmax, the loss and the optimizer are not counted (each is O(d) per row, not
O(d^2)). A layer whose output reaches no loss (the clean stream's last layer of the per-position
model, which only provides keys and values) has no backward beyond its key/value projection.

Per step, with B windows of T tokens, width d, MLP width h, vocabulary V (tied head):
- dense: the prelude, core and coda layers once over the clean stream, and the head;
- per-position DiffusionBlocks: that clean stream (without the head, its last layer giving keys and
  values only), then the noisy rows through the core and coda attending to [clean T ; own T] keys;
- sequence-joint DiffusionBlocks: the prelude once, the noisy rows through core and coda causally;
- BPTT (sequence recurrence): the prelude, r iterations of injection + core with the last k
  differentiated, the coda and head; r is drawn per step (its expectation is taken over the sampler).
"""

from __future__ import annotations

import copy
import tempfile

import torch

from ..config import Config
from ..errors import ConfigError
from ..layers import FEW_QUERIES

SIGMA_FEATURES = 256  # the sigma embedder's sinusoidal features (loopdb.layers.SigmaEmbedder)
EXPECTATION_DRAWS = 4096  # depth draws averaged for BPTT's expected step (seeded: the same every time)


def linear_flops(rows: int, fan_in: int, fan_out: int, backward: bool = True, input_grad: bool = True) -> int:
    forward = 2 * rows * fan_in * fan_out
    return forward + (forward * (2 if input_grad else 1) if backward else 0)


def attention_flops(batch: int, queries: int, keys: int, dim: int, backward: bool = True,
                    recomputed: bool = True) -> int:
    """``recomputed``: the fused kernel's backward recomputes the scores (5 products, else 4)."""
    product = 2 * batch * queries * keys * dim  # one of QK^T or AV, all heads together
    return 2 * product + ((5 if recomputed else 4) * product if backward else 0)


def block_flops(batch: int, length: int, keys: int, dim: int, hidden: int, cond_rows: int = 0,
                backward: bool = True, output_used: bool = True) -> int:
    """One transformer block on ``length`` rows of each of ``batch`` windows attending to ``keys`` keys
    (more keys than rows: a cached prefix before them); ``cond_rows``: rows of adaLN conditioning
    (0 = a plain block); ``output_used`` False: only its keys and values are read downstream."""
    recomputed = keys == length or length > FEW_QUERIES
    rows = batch * length
    total = linear_flops(rows, dim, 3 * dim, backward) + linear_flops(cond_rows, dim, 6 * dim, backward)
    rest = (attention_flops(batch, length, keys, dim, False) + linear_flops(rows, dim, dim, False)
            + linear_flops(rows, dim, hidden, False) + linear_flops(rows, hidden, dim, False))
    if output_used and backward:
        rest = (attention_flops(batch, length, keys, dim, recomputed=recomputed) + linear_flops(rows, dim, dim)
                + linear_flops(rows, dim, hidden) + linear_flops(rows, hidden, dim))
    return total + rest


def analytic_step_flops(config: Config, depth: int | None = None) -> float:
    """FLOPs of one training step (forward + backward, all micro-batches) of a looped text LM, from its
    config (the module docstring says what is counted). BPTT: at ``depth`` iterations, or by default
    the expectation over its depth sampler."""
    m, d, t = config.model, config.diffusion, config.train
    if m.family != "looped" or t.task or t.objective == "ouro":
        raise ConfigError("analytic_step_flops covers the looped text LM trained by dense, diffusion or bptt, not "
                          f"family={m.family} objective={t.objective}" + (f" task={t.task}" if t.task else ""))
    if m.draft_width > 1 or t.anchor_weight or d.self_condition or d.rollout_fraction:
        raise ConfigError("analytic_step_flops does not cover drafting, the anchor head, self-conditioning or "
                          "rollouts; count such a step with counted_step_flops")
    if m.injection != "concat" or not m.tie_head:
        raise ConfigError("analytic_step_flops assumes injection=concat and tie_head=true")
    batch, length, dim = t.batch_size, m.context, m.d_model
    hidden, rows = int(dim * m.mlp_ratio), t.batch_size * m.context

    def layers(count, keys=length, cond_rows=0, backward=True, last_output_used=True):
        return sum(block_flops(batch, length, keys, dim, hidden, cond_rows, backward,
                               last_output_used or index < count - 1) for index in range(count))

    head = linear_flops(rows, dim, m.vocab_size)
    prelude = layers(m.n_prelude)
    if t.objective == "dense":
        total = prelude + layers(m.n_core, cond_rows=batch) + layers(m.n_coda) + head
    elif t.objective == "bptt":
        total = prelude + _expected_recurrence(config, depth, rows) + layers(m.n_coda) + head
    elif config.recurrence == "sequence":  # sequence-joint DiffusionBlocks: conditioning per row
        sigma = linear_flops(rows, SIGMA_FEATURES, dim, input_grad=False) + linear_flops(rows, dim, dim)
        total = prelude + sigma + linear_flops(rows, 2 * dim, dim) + layers(m.n_core, cond_rows=rows) \
            + layers(m.n_coda) + head
    else:  # per-position DiffusionBlocks: the clean stream, then the noisy rows over [clean ; own] keys
        clean_core = m.n_coda == 0  # the clean stream's last layer only gives keys and values
        clean = layers(m.n_prelude) + layers(m.n_core, cond_rows=batch, last_output_used=not clean_core) \
            + layers(m.n_coda, last_output_used=False)
        sigma = linear_flops(batch, SIGMA_FEATURES, dim, input_grad=False) + linear_flops(batch, dim, dim)
        noisy = (sigma + linear_flops(rows, 2 * dim, dim) + layers(m.n_core, 2 * length, cond_rows=batch)
                 + linear_flops(rows, dim, dim) + layers(m.n_coda, 2 * length) + head)
        total = clean + noisy
    return float(total * t.grad_accum)


def _expected_recurrence(config: Config, depth: int | None, rows: int) -> float:
    """BPTT's r iterations of injection + core, the last backprop_depth differentiated; the mean over
    the depth sampler's draws unless ``depth`` is given."""
    m, t = config.model, config.train
    dim, hidden, batch, length = m.d_model, int(m.d_model * m.mlp_ratio), t.batch_size, m.context

    def iteration(backward: bool) -> int:
        return linear_flops(rows, 2 * dim, dim, backward) + sum(
            block_flops(batch, length, length, dim, hidden, 0, backward) for _ in range(m.n_core))

    if depth is not None:
        depths = [depth]
    else:
        from ..objectives.next_token import sample_depth

        generator = torch.Generator().manual_seed(0)
        depths = [sample_depth(t.depth_sampler, t.mean_depth, generator) for _ in range(EXPECTATION_DRAWS)]
    differentiated = sum(min(r, t.backprop_depth) for r in depths) / len(depths)
    mean = sum(depths) / len(depths)
    return (mean - differentiated) * iteration(False) + differentiated * iteration(True)


def _attention_formulas() -> dict:
    """FlopCounterMode's attention formulas for the CPU kernel, which it does not map by itself."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def counted_step_flops(config: Config, data_dir) -> int:
    """FLOPs FlopCounterMode counts over one real trainer step (step 0: the batch, forward, backward and
    the optimizer update) of ``config`` on ``data_dir``, in a throwaway run folder. BPTT draws its depth
    for the step as in training; pass depth_sampler=fixed for a step at exactly mean_depth."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..training.trainer import Trainer

    config = copy.deepcopy(config)
    config.train.device, config.train.compile, config.train.bf16 = "cpu", False, False
    with tempfile.TemporaryDirectory(prefix="loopdb-flops-") as run_dir:
        trainer = Trainer(config, data_dir, run_dir, progress=False, log_tensorboard=False)
        try:
            with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
                trainer.train_step()
        finally:
            from ..runs.lock import release_run_folder

            release_run_folder(trainer.run_dir)
    return counter.get_total_flops()


def step_flops(config: Config, data_dir) -> dict:
    """A member's FLOPs per training step both ways: ``analytic`` (BPTT: expected over its depth sampler)
    and ``counted`` by FlopCounterMode over a real step (BPTT: at exactly its mean depth)."""
    counted = copy.deepcopy(config)
    if counted.train.objective == "bptt":
        counted.train.depth_sampler = "fixed"
    return {"analytic": analytic_step_flops(config), "counted": counted_step_flops(counted, data_dir)}
