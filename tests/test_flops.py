"""Training FLOPs per step: FlopCounterMode over a real trainer step, the analytic count from the config,
and a count by hand of every matrix product, on one tiny config. Counted: matmuls and attention's two
products (2*m*n*k each), forward and backward; nothing else (loopdb.evaluation.flops)."""

import pytest

from loopdb.config import preset
from loopdb.errors import ConfigError
from loopdb.evaluation.flops import analytic_step_flops, counted_step_flops

B, T, D, H, V = 2, 24, 16, 64, 400  # windows, context (> 16: attention takes the SDPA kernel), width, MLP, vocab
R = B * T                            # rows of a step
SHAPE = {"context": T, "d_model": D, "n_heads": 2, "n_prelude": 1, "n_core": 1, "n_coda": 1, "batch_size": B,
         "warmup_steps": 1}


def mm(m, n, k):
    """One matrix product (m x k) @ (k x n)."""
    return 2 * m * n * k


def linear(rows, fan_in, fan_out):
    """Forward, weight gradient and input gradient."""
    return 3 * mm(rows, fan_in, fan_out)


def block(keys=T, cond_rows=0):
    """A block, forward and backward: qkv, attention (2 products forward, 5 backward), proj, MLP, adaLN."""
    return (linear(R, D, 3 * D) + 7 * mm(R, keys, D) + linear(R, D, D) + linear(R, D, H) + linear(R, H, D)
            + (linear(cond_rows, D, 6 * D) if cond_rows else 0))


def forward_block():
    return mm(R, D, 3 * D) + 2 * mm(R, T, D) + mm(R, D, D) + mm(R, D, H) + mm(R, H, D)


HEAD = linear(R, D, V)
BY_HAND = {
    "dense": block() + block(cond_rows=B) + block() + HEAD,
    # clean stream: its coda only gives keys and values (its qkv is differentiated, the rest forward only);
    # sigma embedder per sequence (its first layer has no input gradient); noisy rows over [clean ; own] keys
    "diffusion": (block() + block(cond_rows=B) + linear(R, D, 3 * D) + forward_block() - mm(R, D, 3 * D)
                  + 2 * mm(B, 256, D) + linear(B, D, D) + linear(R, 2 * D, D) + block(2 * T, cond_rows=B)
                  + linear(R, D, D) + block(2 * T) + HEAD),
    # sigma embedder and adaLN per position
    "joint": block() + 2 * mm(R, 256, D) + linear(R, D, D) + linear(R, 2 * D, D) + block(cond_rows=R) + block() + HEAD,
    # depth 3, gradients through the last 2: one iteration (injection + core) forward only
    "bptt": (block() + mm(R, 2 * D, D) + forward_block() + 2 * (linear(R, 2 * D, D) + block()) + block() + HEAD),
}
MEMBERS = {"dense": {"objective": "dense"}, "diffusion": {"objective": "diffusion"},
           "joint": {"objective": "diffusion", "recurrence": "sequence", "train_grid_fraction": 0},
           "bptt": {"objective": "bptt", "depth_sampler": "fixed", "mean_depth": 3, "backprop_depth": 2}}


def member_config(name, **extra):
    config = preset("tiny").apply_overrides({k: str(v) for k, v in {**SHAPE, **MEMBERS[name], **extra}.items()})
    config.model.vocab_size = V
    return config


@pytest.mark.parametrize("name", list(MEMBERS))
def test_counted_and_analytic_step_flops_match_the_count_by_hand(name, data_dir):
    config = member_config(name)
    assert counted_step_flops(config, data_dir) == BY_HAND[name]
    assert analytic_step_flops(config) == BY_HAND[name]


def test_gradient_accumulation_multiplies_the_step(data_dir):
    config = member_config("joint", grad_accum=2)
    assert counted_step_flops(config, data_dir) == analytic_step_flops(config) == 2 * BY_HAND["joint"]


def test_bptt_expected_step_lies_between_its_shallow_and_deep_steps():
    config = member_config("bptt", depth_sampler="poisson_lognormal", mean_depth=8, backprop_depth=2)
    expected = analytic_step_flops(config)
    assert analytic_step_flops(config, depth=2) < expected < analytic_step_flops(config, depth=40)
    assert analytic_step_flops(config) == expected  # seeded: the same every time


def test_analytic_flops_refuses_what_it_does_not_cover():
    with pytest.raises(ConfigError, match="self-conditioning"):
        analytic_step_flops(member_config("diffusion", self_condition="true"))


def test_a_short_context_counts_the_few_query_attention_of_the_noisy_rows(data_dir):
    # at most 16 noisy rows attend to the clean prefix with plain matmuls: 4 backward products, not 5
    config = member_config("diffusion", context=16)
    assert counted_step_flops(config, data_dir) == analytic_step_flops(config)
