"""Layers, the EDM sampler's pieces, adaptive exit and the key/value cache of an exported loopdb model
(`loopdb export` writes this file beside hf_modeling.py). Imports torch and transformers only; each
piece repeats loopdb's own (loopdb.layers, loopdb.maths.edm, loopdb.maths.exit) operation for operation."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .hf_configuration import LoopDBConfig

READOUTS = ("predictive", "draw", "anchor")
SAMPLER_CHOICES = {"grid": ("equiprob", "karras", "geometric"), "solver": ("euler", "heun", "ancestral"),
                   "estimate": ("soft", "argmax", "sample"), "grid_sigma_last": None, "wavefront": None}
EXIT_KINDS = ("kl", "delta", "gate")


# -- layers (loopdb.layers) -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        statistics = torch.promote_types(x.dtype, torch.float32)  # float32 statistics for bf16 inputs
        squared = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=statistics).square()
        normed = x * (squared / x.shape[-1] + self.eps).rsqrt().to(x.dtype)
        return normed if self.weight is None else normed * self.weight.to(x.dtype)


def rotary_angles(positions: torch.Tensor, head_dim: int, context: int):
    """cos, sin of rotary positions (any shape) -> (..., head_dim / 2); computed per call, never a buffer."""
    if int(positions.max()) >= context:
        raise ValueError(f"position {int(positions.max())} is beyond the model's context of {context} tokens")
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x (..., T, hd); cos/sin (T, hd/2) or per row (B, T, hd/2): rotate (first half, second half)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, kv_prefix=None, mask=None):
        """Keys [kv_prefix ; own]; mask (Tq, Tk) or (B, 1, Tq, Tk) bool, True = attend; None = causal."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k = apply_rotary(qkv[:2], cos, sin)
        v = qkv[2]
        keys, values = k, v
        if kv_prefix is not None:
            keys, values = torch.cat([kv_prefix[0], k], dim=2), torch.cat([kv_prefix[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    """Pre-norm block; ``conditioned``: DiT's adaLN-Zero; ``sandwich``: Huginn's norm after each residual add."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, conditioned: bool = False, sandwich: bool = False):
        super().__init__()
        self.conditioned = conditioned
        self.post_norms = nn.ModuleList([RMSNorm(dim), RMSNorm(dim)]) if sandwich else None
        self.norm1 = RMSNorm(dim, affine=not conditioned)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim, affine=not conditioned)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        if conditioned:
            self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, cos, sin, cond=None, kv_prefix=None, mask=None):
        if self.conditioned:
            mod = self.modulation(F.silu(cond))
            if mod.dim() == 2:
                mod = mod[:, None, :]
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            h, kv = self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, kv_prefix, mask)
            x = x + gate1 * h
            return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2), kv
        h, kv = self.attn(self.norm1(x), cos, sin, kv_prefix, mask)
        if self.post_norms is not None:
            x = self.post_norms[0](x + h)
            return self.post_norms[1](x + self.mlp(self.norm2(x))), kv
        x = x + h
        return x + self.mlp(self.norm2(x)), kv


class SigmaEmbedder(nn.Module):
    """c_noise -> sinusoidal features -> MLP (DiT's TimestepEmbedder)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise):
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        args = (c_noise.float()[..., None] * 1000.0) * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


def inject(injection, state, embedded):
    """The loop's input: Linear([state ; e]) (Huginn's adapter), or state + e without one."""
    state = state.to(embedded.dtype)
    return injection(torch.cat([state, embedded], -1)) if injection is not None else state + embedded


def padded_causal_mask(query_index, key_index, pad):
    """(B, 1, Tq, Tk): row b's first pad[b] slots are padding; a padding query sees only itself."""
    causal = key_index[None, None, :] <= query_index[None, :, None]
    real = key_index[None, None, :] >= pad[:, None, None]
    itself = key_index[None, None, :] == query_index[None, :, None]
    return (causal & (real | itself))[:, None]


def padded_positions(index, pad):
    return (index[None, :] - pad[:, None]).clamp_min(0)


# -- EDM (loopdb.maths.edm) -----------------------------------------------------------------------------
def grid_curve(config: LoopDBConfig, kind: str, sigma_last: float):
    """The sigma a grid of kind ``kind`` reaches at progress f in [0, 1] (0: sigma_max, 1: sigma_last):
    equiprob (equal steps in the training distribution's quantiles), karras (rho = 7) or geometric
    (equal steps in log sigma)."""
    hi, lo = config.sigma_max, sigma_last
    if kind == "equiprob":
        normal = NormalDist()

        def cdf(sigma):
            return normal.cdf((math.log(sigma) - config.p_mean) / config.p_std)

        q_hi, q_lo = cdf(hi), cdf(lo)
        return lambda f: math.exp(config.p_mean + config.p_std * normal.inv_cdf(q_hi + f * (q_lo - q_hi)))
    if kind == "karras":
        a, b = hi ** (1 / 7.0), lo ** (1 / 7.0)
        return lambda f: (a + f * (b - a)) ** 7.0
    log_hi, log_lo = math.log(hi), math.log(lo)
    return lambda f: math.exp(log_hi + f * (log_lo - log_hi))


def sigma_last(config: LoopDBConfig, sampler: dict) -> float:
    """Where the sampler ends (and where the known positions of a sequence-joint model sit)."""
    return sampler["grid_sigma_last"] or config.sigma_min


def sigma_grid(config: LoopDBConfig, num_loops: int, sampler: dict) -> list[float]:
    """The descending sampler grid of ``num_loops`` steps; one step: a single evaluation at sigma_max."""
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    hi, lo = config.sigma_max, sigma_last(config, sampler)
    if num_loops == 1:
        return [hi]
    curve = grid_curve(config, sampler["grid"], lo)
    grid = [curve(i / (num_loops - 1)) for i in range(num_loops)]
    grid[0], grid[-1] = hi, lo
    return grid


def position_sigmas(config: LoopDBConfig, num_loops: int, length: int, sampler: dict) -> torch.Tensor:
    """(K, T) float32: the sigma of every position at every loop of a sequence-joint model
    (loopdb.maths.schedules). Wavefront width W: at loop i position t has progress
    clamp(i/(K-1) (1 + W) - W t/(T-1), 0, 1) along the grid curve (W = 0 or one position: the grid)."""
    width = float(sampler["wavefront"])
    if num_loops == 1:
        progress = torch.zeros(1, length, dtype=torch.float64)
    else:
        loop = torch.arange(num_loops, dtype=torch.float64)[:, None] / (num_loops - 1)
        position = torch.arange(length, dtype=torch.float64)[None, :] / max(length - 1, 1)
        if width == 0 or length == 1:
            progress = loop.expand(num_loops, length).clone()
        else:
            progress = (loop * (1 + width) - width * position).clamp(0.0, 1.0)
    hi, lo = config.sigma_max, sigma_last(config, sampler)
    curve = grid_curve(config, sampler["grid"], lo)
    table = {value: hi if value == 0.0 else lo if value == 1.0 else curve(value) for value in progress.unique().tolist()}
    return torch.tensor([[table[value] for value in row] for row in progress.tolist()], dtype=torch.float32)


def block_owner(config: LoopDBConfig, sigma: float) -> int:
    """The stacked block that denoises at ``sigma``: block 0 owns the highest of ``num_blocks`` ranges,
    of equal probability under the training log-normal (equiprob) or equal width in log sigma (uniform)."""
    blocks, low, high = config.num_blocks, config.sigma_min, config.sigma_max
    if config.partition == "equiprob":
        normal = NormalDist()
        q_min, q_max = (normal.cdf((math.log(value) - config.p_mean) / config.p_std) for value in (low, high))
        inner = [math.exp(config.p_mean + config.p_std * normal.inv_cdf(q_min + b / blocks * (q_max - q_min)))
                 for b in range(1, blocks)]
    else:
        inner = [math.exp(math.log(low) + b / blocks * (math.log(high) - math.log(low))) for b in range(1, blocks)]
    boundaries = [low, *inner, high]
    for block_index in range(blocks):
        if sigma > boundaries[blocks - 1 - block_index]:
            return block_index
    return blocks - 1


class DiffusionBlock(nn.Module):
    """A stacked block: its layers, clean conditioning, input projection and denoiser output."""

    def __init__(self, config: LoopDBConfig):
        super().__init__()
        dim = config.d_model
        self.layers = nn.ModuleList(Block(dim, config.n_heads, config.mlp_ratio, True)
                                    for _ in range(config.n_layers // config.num_blocks))
        self.clean_condition = nn.Parameter(torch.zeros(dim))
        self.injection = nn.Linear(2 * dim, dim, bias=False) if config.injection == "concat" else None
        self.norm = RMSNorm(dim)
        self.denoiser_out = nn.Linear(dim, dim, bias=False)


def log_mean_exp(draws: list[torch.Tensor]) -> torch.Tensor:
    total = draws[0]
    for draw in draws[1:]:
        total = torch.logaddexp(total, draw)
    return total - math.log(len(draws))


class ExitTracker:
    """Adaptive exit per position (loopdb.maths.exit): ``kl:EPS`` stops once KL(p_k || p_(k-1)) < EPS,
    ``delta:EPS`` once the state's relative change < EPS, ``gate:Q`` once the learned cumulative exit
    probability >= Q (Ouro). A position that stops keeps its state; ``loops_used`` counts its loops."""

    def __init__(self, rule: str | None, shape, device):
        self.kind, self.threshold = None, None
        if rule:
            kind, _, value = str(rule).partition(":")
            try:
                threshold = float(value)
            except ValueError:
                threshold = float("nan")
            if kind not in EXIT_KINDS or not threshold > 0 or (kind == "gate" and threshold > 1):
                raise ValueError(f"exit={rule!r}: expected kl:EPS, delta:EPS (EPS > 0) or gate:Q (0 < Q <= 1)")
            self.kind, self.threshold = kind, threshold
        self.active = torch.ones(shape, dtype=torch.bool, device=device)
        self.loops_used = torch.zeros(shape, dtype=torch.long, device=device)
        self.previous_log_probs, self.survival = None, torch.ones(shape, device=device)

    def update(self, old_state, new_state, logits=None, exit_probability=None) -> None:
        self.loops_used += self.active.long()
        if self.kind == "kl":
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            stop = torch.zeros_like(self.active)
            if self.previous_log_probs is not None:
                stop = (log_probs.exp() * (log_probs - self.previous_log_probs)).sum(-1) < self.threshold
            self.previous_log_probs = log_probs
        elif self.kind == "delta":
            change = (new_state.float() - old_state.float()).norm(dim=-1)
            stop = change < self.threshold * new_state.float().norm(dim=-1).clamp(min=1e-12)
        elif self.kind == "gate":
            self.survival = self.survival * (1 - exit_probability.float())
            stop = (1 - self.survival) >= self.threshold
        else:
            return
        self.active &= ~stop


# -- the key/value cache -------------------------------------------------------------------------------------
class LoopDBCache(DynamicCache):
    """Keys/values of the positions decoded so far, one slot per layer of the prelude and the coda and,
    for the core, per layer of the clean stream (position recurrence: one set whatever the loop
    count) or per loop and layer (sequence recurrence: loop k of a new token attends to loop k of
    the earlier ones); for a stacked model, per block and layer. A sequence-joint model keeps one set
    too: its core and coda slots hold the known positions, at their clean targets (hf_joint.py).
    ``last_only`` (sequence recurrence): one core set holding each position's last loop, which every
    loop of later tokens attends to (Ouro's shortcut: memory independent of K, an approximation).
    ``length``: the positions cached."""

    def __init__(self, config: LoopDBConfig, num_loops: int, last_only: bool = False):
        super().__init__()
        self.length, self.last_only = 0, last_only
        core_sets = num_loops if config.recurrence == "sequence" and not config.joint and not last_only else 1
        self.first = {"prelude": 0, "core": config.n_prelude, "coda": config.n_prelude + core_sets * config.n_core,
                      "block": 0}
        self.group_size = {"core": config.n_core, "block": config.n_layers // config.num_blocks}

    def slot(self, stream: str, layer: int, group: int = 0) -> int:
        """The slot of ``layer`` of ``stream``; ``group``: the loop (sequence core) or the stacked block."""
        return self.first[stream] + group * self.group_size.get(stream, 0) + layer

    def past(self, slot: int):
        """(keys, values) cached in ``slot``, or None before the first update."""
        if slot >= len(self.layers) or not self.layers[slot].is_initialized:
            return None
        return self.layers[slot].keys, self.layers[slot].values


