"""Transformer layers shared by every loopdb model.

RMSNorm, rotary positions, the MLP, attention (PyTorch SDPA, or xformers on CUDA
after a probe), the sigma embedder and one transformer block that is either plain
or AdaLN-Zero conditioned (DiT). Attention masks for the two-stream
``[noisy ; clean]`` layout (docs/method.md#looped-lm) are built here, once, from positions.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rms_normalise(x, weight, eps):
    """(output, x * inverse_rms, inverse_rms): the CPU forward of RMSNorm, with autograd or without
    (one computation, so a model gives the same numbers in training and in evaluation)."""
    statistics = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs: float32 statistics
    squared_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=statistics).square_()
    inverse_rms = squared_norm.div_(x.shape[-1]).add_(eps).rsqrt_().to(x.dtype)  # (..., 1)
    normed = x * inverse_rms
    return (normed if weight is None else normed * weight), normed, inverse_rms


class _RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight with a hand-written backward: on CPU, F.rms_norm is
    a chain of small ops in both directions. This one makes few passes over the activations:
    one fused norm for the statistics, the normalised x saved for backward, and the two
    reductions of the weighted backward as matrix-vector products."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        output, normed, inverse_rms = _rms_normalise(x, weight, eps)
        ctx.save_for_backward(normed, weight, inverse_rms)
        return output

    @staticmethod
    def backward(ctx, grad):
        normed, weight, inverse_rms = ctx.saved_tensors
        dim = normed.shape[-1]
        # d/dx of x * r(x): r * (g' - xhat * mean(g' * xhat)), with g' = g * weight and xhat = x * r
        grad_weight = None
        if weight is None:
            grad_x = grad * inverse_rms
            projection = (grad * normed).sum(-1, keepdim=True)
        else:
            rows = (grad * normed).reshape(-1, dim)  # (N, C): g * xhat
            grad_weight = rows.sum(0)
            projection = (rows @ weight).view(*grad.shape[:-1], 1)  # sum over C of g * weight * xhat
            grad_x = (grad * weight).mul_(inverse_rms)
        return grad_x.addcmul_(normed, projection * inverse_rms, value=-1.0 / dim), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)  # no mixed-dtype product under autocast
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # fused on accelerators and by the compiler
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
            return _RMSNormFunction.apply(x, weight, self.eps)
        return _rms_normalise(x, weight, self.eps)[0]


class Rotary(nn.Module):
    """Rotary position embedding; cos/sin looked up by explicit positions, so the
    noisy and clean copies of a token share a position (docs/method.md#pitfall-3)."""

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, hd/2)
        # non-persistent: derived from the config, never part of a checkpoint
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor):
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's context of {self.cos.shape[0]} tokens"
            )
        return self.cos[positions], self.sin[positions]  # (T, hd/2) each


def _rotate(x, cos, sin, direction: float):
    """Rotate pairs (first half, second half) of x's last dim by +/- the angles, written into one
    new tensor: four fused passes, no intermediate halves and no concatenation."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_first, out_second = out[..., :half], out[..., half:]
    torch.mul(first, cos, out=out_first).addcmul_(second, sin, value=-direction)
    torch.mul(second, cos, out=out_second).addcmul_(first, sin, value=direction)
    return out


class _RotaryFunction(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation: backward saves only cos and sin, never the
    activations, and costs what forward costs."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def apply_rotary(x, cos, sin):
    """x: (..., T, hd), e.g. (B, H, T, hd) or q and k stacked (2, B, H, T, hd); cos/sin (T, hd/2)
    or per row (B, T, hd/2); rotate pairs (first half, second half)."""
    if cos.dim() == 3:  # per-row positions (left-padded batches): broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():  # the compiler fuses the plain expression (and cannot trace out=)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin, 1.0)


# -- masks for the two-stream layout --------------------------------------------------
def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk) bool, True where the key may be attended: key position <= query position."""
    return key_positions[None, :] <= query_positions[:, None]


def padded_causal_mask(query_index: torch.Tensor, key_index: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool for left-padded rows: row b's first ``pad[b]`` slots are padding.
    A query sees earlier-or-equal real keys of its row; a padding query sees only itself, so
    no row is ever fully masked (its output is never read)."""
    causal = key_index[None, None, :] <= query_index[None, :, None]  # (1, Tq, Tk)
    real = key_index[None, None, :] >= pad[:, None, None]  # (B, 1, Tk)
    itself = key_index[None, None, :] == query_index[None, :, None]
    return (causal & (real | itself))[:, None]


def padded_positions(index: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """(B, T) rotary positions of slots ``index`` in left-padded rows: a row's first real token is position 0."""
    return (index[None, :] - pad[:, None]).clamp_min(0)


def clean_context_mask(query_positions: torch.Tensor, context_positions: torch.Tensor,
                       pad: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the NOISY stream over keys [clean context ; noisy rows].

    A noisy row at position t sees clean keys at positions <= t and itself, never
    another noisy row (docs/method.md#looped-lm). Every row sees at least itself, so no row is
    ever fully masked (docs/method.md#pitfall-2). With ``pad`` (B,) the batch is left-padded and
    the arguments are slot indices: (B, 1, Tq, Tk) that also hides the padding keys.
    """
    to_self = torch.eye(len(query_positions), dtype=torch.bool, device=query_positions.device)
    if pad is None:
        return torch.cat([causal_mask(query_positions, context_positions), to_self], dim=1)
    to_clean = padded_causal_mask(query_positions, context_positions, pad)
    return torch.cat([to_clean, to_self.expand(len(pad), 1, -1, -1)], dim=-1)


# -- attention backends ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def xformers_usable(device_type: str) -> bool:
    """xformers is CUDA-only: probe it once per device type, fall back to SDPA otherwise."""
    if device_type != "cuda":
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 4, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # not installed, no kernel for this GPU, ...: SDPA is always correct
        return False


def attention(q, k, v, mask: torch.Tensor | None = None, is_causal: bool = False, backend: str = "auto"):
    """q: (B, H, Tq, hd), k/v: (B, H, Tk, hd); mask: (Tq, Tk) or (B, 1, Tq, Tk) bool, True = attend."""
    if backend in ("auto", "xformers") and q.device.type == "cuda" and xformers_usable(q.device.type):
        import xformers.ops as xops

        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], *mask.shape[-2:])
        elif is_causal:
            bias = xops.LowerTriangularMask()
        # xformers wants (B, T, H, hd)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    if backend == "xformers":
        raise RuntimeError("attention backend 'xformers' needs CUDA and `pip install loopdb[xformers]`")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


FEW_QUERIES = 16  # up to this many query rows (a generation step, a draft's slots) attend without a key copy


def few_query_attention(q, prefix, k, v, mask: torch.Tensor | None):
    """Attention of a few queries over [prefix keys ; own keys] without concatenating them: at a
    generation step the copy of a long cache (per layer, per loop) cost more than the attention
    itself. q: (B, H, Tq, hd); prefix: (k, v) each (B, H, Tp, hd); mask as in ``attention``
    over the Tp + Tk keys (None: every key)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.cat([q @ prefix[0].transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    length = prefix[0].shape[2]
    return weights[..., :length] @ prefix[1] + weights[..., length:] @ v


# -- sigma conditioning -----------------------------------------------------------------
class SigmaEmbedder(nn.Module):
    """c_noise -> sinusoidal features -> MLP -> conditioning vector (DiT's TimestepEmbedder)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]: scale up so the features vary
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        args = (c_noise.float()[..., None] * 1000.0) * freqs
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def init_linears(root: nn.Module, generator: torch.Generator | None = None) -> None:
    """N(0, 0.02) for every linear layer under ``root``, except those left at zero (adaLN-Zero)."""
    for module in root.modules():
        if isinstance(module, nn.Linear) and module.weight.abs().sum() > 0:  # keep adaLN-Zero's zeros
            nn.init.normal_(module.weight, std=0.02, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_weights(model: nn.Module) -> None:
    """init_linears, then N(0, 0.02) for every embedding table."""
    init_linears(model)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model={dim} is not divisible by n_heads={num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, kv_prefix=None, mask=None, causal=True):
        """Returns (output, (k, v)) where k, v are this call's own keys/values, for caching.

        kv_prefix: keys/values attended BEFORE this call's own, e.g. the clean
        stream's cache; mask covers [prefix ; own] keys. Without a mask attention is
        causal, or full (bidirectional) with ``causal=False``.
        """
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k = apply_rotary(qkv[:2], cos, sin)  # q and k in one pass: half the small ops
        v = qkv[2]
        if kv_prefix is not None and T <= FEW_QUERIES:
            out = few_query_attention(q, (kv_prefix[0].to(k.dtype), kv_prefix[1].to(v.dtype)), k, v, mask)
        else:
            keys, values = k, v
            if kv_prefix is not None:
                keys = torch.cat([kv_prefix[0].to(k.dtype), k], dim=2)
                values = torch.cat([kv_prefix[1].to(v.dtype), v], dim=2)
            out = attention(q, keys, values, mask=mask, is_causal=causal and mask is None, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block; with ``conditioned`` it is DiT's adaLN-Zero block.

    Conditioning: shift/scale/gate for attention and MLP from Linear(SiLU(cond)),
    zero-initialised so the block starts as the identity (DiT).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, conditioned: bool = False,
                 backend: str = "auto", sandwich: bool = False):
        """``sandwich`` (plain blocks only): Huginn's extra norm after each residual add, which keeps
        the state's scale fixed however many times a looped block is applied."""
        super().__init__()
        self.conditioned = conditioned
        if sandwich and conditioned:
            raise ValueError("the sandwich norm is for plain blocks (an adaLN block is conditioned instead)")
        self.post_norms = nn.ModuleList([RMSNorm(dim), RMSNorm(dim)]) if sandwich else None
        self.norm1 = RMSNorm(dim, affine=not conditioned)
        self.attn = SelfAttention(dim, num_heads, backend)
        self.norm2 = RMSNorm(dim, affine=not conditioned)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        if conditioned:
            self.modulation = nn.Linear(dim, 6 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x, cos, sin, cond=None, kv_prefix=None, mask=None, causal=True):
        """x: (B, T, C); cond: (B, C) or (B, T, C) when conditioned; ``causal=False`` with no
        mask attends both ways (the masked diffusion LM). Returns (x, (k, v))."""
        if self.conditioned:
            if cond is None:
                raise ValueError("a conditioned block needs a conditioning vector")
            mod = self.modulation(F.silu(cond))
            if mod.dim() == 2:
                mod = mod[:, None, :]
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            # addcmul: one fused op each for modulate and gate (adaLN-Zero), forward and backward
            h, kv = self.attn(torch.addcmul(shift1, self.norm1(x), 1 + scale1), cos, sin, kv_prefix, mask, causal)
            x = torch.addcmul(x, gate1, h)
            x = torch.addcmul(x, gate2, self.mlp(torch.addcmul(shift2, self.norm2(x), 1 + scale2)))
            return x, kv
        h, kv = self.attn(self.norm1(x), cos, sin, kv_prefix, mask, causal)
        if self.post_norms is not None:
            x = self.post_norms[0](x + h)
            return self.post_norms[1](x + self.mlp(self.norm2(x))), kv
        x = x + h
        return x + self.mlp(self.norm2(x)), kv


def inject(injection: nn.Module | None, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """Input injection of a looped model: Huginn's adapter Linear([state ; e]), or state + e without one."""
    state = state.to(embedded.dtype)
    return injection(torch.cat([state, embedded], -1)) if injection is not None else state + embedded


def run_clean_layers(layers, hidden, cos, sin, past=None, cond=None, mask=None, call=None):
    """Run a clean (context) stream through ``layers``; ``past``: per layer the cached (k, v)
    of earlier positions, or None. Returns (hidden, per-layer (k, v) over past and new positions).
    ``call(layer, hidden, cos, sin, cond, kv_prefix, mask)`` replaces the plain layer call
    (e.g. with activation checkpointing)."""
    new_kv = []
    for index, layer in enumerate(layers):
        prefix = None if past is None else past[index]
        if call is None:
            hidden, (k, v) = layer(hidden, cos, sin, cond=cond, kv_prefix=prefix, mask=mask)
        else:
            hidden, (k, v) = call(layer, hidden, cos, sin, cond, prefix, mask)
        if prefix is not None:
            k, v = extend_cache(prefix[0], k), extend_cache(prefix[1], v)
        new_kv.append((k, v))
    return hidden, new_kv


def extend_cache(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cached`` (B, H, T, hd) keys or values followed by ``new`` (B, H, n, hd), along the positions.

    Concatenating copies the whole cache for every token and layer (at batch 8, d=256 and 512
    positions, 32 MiB per token over 4 layers). Without autograd the cache lives in a buffer with room to
    grow instead, and extending its newest view writes in place. Extending any other view (an older
    context, one cut back by speculative decoding) copies, so no context ever sees another's writes."""
    if torch.is_grad_enabled():
        return torch.cat([cached, new], dim=2)
    length, total = cached.shape[2], cached.shape[2] + new.shape[2]
    buffer = cached._base
    in_place = (buffer is not None and getattr(buffer, "_loopdb_filled", None) == length
                and buffer.shape[2] >= total and buffer.dtype == new.dtype
                and buffer[:, :, :length].stride() == cached.stride() and buffer.data_ptr() == cached.data_ptr())
    if not in_place:  # a new buffer, twice the length: appends cost O(1) amortised
        buffer = cached.new_empty(*cached.shape[:2], max(2 * total, 64), cached.shape[3], dtype=new.dtype)
        buffer[:, :, :length] = cached
    buffer[:, :, length:total] = new
    buffer._loopdb_filled = total  # the newest view's length: only it may extend in place
    return buffer[:, :, :total]
