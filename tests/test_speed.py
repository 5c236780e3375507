"""bench speed: the FLOP count, the hand-written RMSNorm and rotary backwards, the allocator setting,
and the report's shape."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from loopdb.evaluation import speed
from loopdb.layers import RMSNorm, Rotary, apply_rotary, attention, few_query_attention
from loopdb.models.reference_gpt import ReferenceGPT

TINY = speed.SpeedDims(d_model=64, n_layers=3, context=16, batch_size=2, vocab_size=64, mean_depth=3,
                       backprop_depth=2)


def test_reference_flops_match_nanogpts_6n_plus_attention_formula():
    """nanoGPT's estimate: 6 N + 12 L T d per token, N = parameters without positions and norms."""
    dims = speed.SpeedDims()
    model = ReferenceGPT(dims.vocab_size, dims.d_model, dims.n_layers, 4, dims.context)
    matrices = sum(p.numel() for name, p in model.named_parameters() if "position" not in name and p.dim() == 2)
    per_token = 6 * matrices + 12 * dims.n_layers * dims.context * dims.d_model
    assert speed.training_flops("reference", dims) == per_token * dims.batch_size * dims.context


def test_the_objectives_cost_more_arithmetic_than_a_dense_step():
    flops = {member: speed.training_flops(member, speed.SpeedDims()) for member in speed.MEMBERS}
    assert flops["reference"] < flops["dense"] < flops["diffusion"] < flops["bptt"]


def test_hand_written_rmsnorm_backward_matches_autograd():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.normal_()
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    norm(x).backward(grad)
    ours = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    F.rms_norm(x, (16,), norm.weight, norm.eps).backward(grad)
    torch.testing.assert_close(ours, (x.grad, norm.weight.grad))
    assert torch.autograd.gradcheck(lambda t: RMSNorm(16, affine=False).double()(t), (x,))


def test_rmsnorm_gives_the_same_numbers_with_and_without_autograd():
    """Training and evaluation run one forward computation (the backward is hand-written)."""
    x = torch.randn(4, 7, 32, requires_grad=True)
    for norm in (RMSNorm(32), RMSNorm(32, affine=False)):
        with torch.no_grad():
            if norm.weight is not None:
                norm.weight.normal_()
            evaluated = norm(x)
        assert torch.equal(norm(x), evaluated)


@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_rotates_pairs_of_halves_and_its_backward_is_the_inverse_rotation(per_row):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)  # (2, B, H, T, hd)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]) if per_row else torch.arange(5)
    cos, sin = (table.double() for table in Rotary(8, 16)(positions))
    first, second = x[..., :4], x[..., 4:]
    c, s = (cos[:, None], sin[:, None]) if per_row else (cos, sin)
    expected = torch.cat([first * c - second * s, first * s + second * c], dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)
    with torch.no_grad():  # the inference path (no autograd function) is the same rotation
        torch.testing.assert_close(apply_rotary(x, cos, sin), expected)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))


def test_keeping_freed_memory_stops_the_page_faults_of_a_repeated_large_allocation():
    """A 64 MiB tensor allocated and freed 8 times: glibc maps it afresh each time (8 x 16k page
    faults of 4 KiB here) until keep_freed_memory, after which the freed block is reused."""
    script = (
        "import resource, torch\n"
        "from loopdb.device import keep_freed_memory\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(8):\n"
        "        torch.ones(4096, 4096)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "plain = faults()\n"
        "assert keep_freed_memory()\n"
        "faults()\n"  # the first allocation after the switch still maps its pages once
        # the best of three: the kernel's proactive reclaim (e.g. DAMON) may take back kept pages once
        "print(plain, min(faults() for _ in range(3)))\n")
    plain, kept = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                          text=True).stdout.split())
    assert plain > 0 and kept * 10 < plain  # relative: with huge pages, faults come 2 MiB at a time


@pytest.mark.parametrize("masked", [False, True])
def test_few_query_attention_equals_attention_over_the_concatenated_keys(masked):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=generator) for _ in range(3))
    prefix = tuple(torch.randn(2, 4, 20, 8, generator=generator) for _ in range(2))
    mask = None
    if masked:  # each query sees a different number of prefix keys, and its own key only
        mask = torch.cat([torch.arange(20)[None] < torch.tensor([5, 12, 20])[:, None], torch.eye(3, dtype=torch.bool)], 1)
    expected = attention(q, torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2), mask=mask)
    assert torch.allclose(few_query_attention(q, prefix, k, v, mask), expected, atol=1e-6)


@pytest.mark.slow  # about a minute: every member, both precisions, the generation grid
def test_bench_speed_json_has_the_documented_ratios(capsys):
    from loopdb.cli import main

    args = ["bench", "speed", "--json", "--d-model=64", "--n-layers=3", "--context=16", "--batch-size=2",
            "--vocab-size=64", "--rounds=1", "--gen-context=8"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"dense_vs_reference_fp32", "dense_vs_reference_bf16", "cached_vs_uncached_k16_ctx8",
            "batch8_vs_batch1_cached_k16", "diffusion_vs_dense_flops_per_s_fp32"} <= set(report["ratios"])
    assert all(value > 0 for value in report["ratios"].values())
    assert set(report["fraction_of_peak"]) == {f"{m}_{p}" for m in speed.MEMBERS for p in ("fp32", "bf16")}
    assert set(report["generation"]) == {f"k{k}_batch{b}_{c}" for k in (1, 16) for b in (1, 8)
                                         for c in ("cached", "uncached")}
    row = report["generation"]["k16_batch8_cached"]
    assert (row["num_loops"], row["batch"], row["cache"]) == (16, 8, True)
    assert row["decode_tokens_per_s"] > row["tokens_per_s"] > 0 and row["prefill_ms"] > 0
    assert report["generation"]["k16_batch8_uncached"]["prefill_ms"] == 0
