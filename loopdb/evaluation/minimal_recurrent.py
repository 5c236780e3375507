"""A minimal Huginn-style recurrent-depth model trained with truncated BPTT: the yardstick that
loopdb's sequence-recurrent ``bptt`` objective (loopdb.models.recurrent) is measured against.

Same architecture as loopdb's looped family with ``recurrence=sequence``: embedding, prelude P,
a core R shared by every loop over the whole sequence (causal attention across the states of all
positions), Huginn's concat adapter Linear([s ; e]), coda C, tied head. One loop:
s_k = norm(R(adapter([s_{k-1} ; e]))), logits = head(norm(C(s_r))). The state starts random
(std ``state_std``); training draws the depth r (Poisson-log-normal with mean ``mean_depth`` or
fixed) and differentiates the last ``backprop_depth`` loops. Every choice loopdb makes
differently is a switch here, so one change at a time can be measured.

It imports only torch and loopdb's task data, so it shares no code with the model it checks.
``task_scores`` is the one scorer of both sides (loopdb.evaluation.bptt_compare).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tasks import IGNORE_INDEX, final_answer_positions, get_task, training_arrays


@dataclass
class MinimalSettings:
    d_model: int = 128
    n_heads: int = 4
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    mlp_ratio: float = 4.0
    context: int = 32
    positions: str = "learned"  # learned (added to the embeddings) | rotary (in every attention)
    init: str = "torch"         # torch: PyTorch's default for linears, N(0, 1) embeddings | small: N(0, 0.02) for all
    state_std: float = 0.02     # std of the random initial state
    mean_depth: int = 6
    backprop_depth: int = 4
    depth_sampler: str = "poisson_lognormal"  # | fixed
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.0      # 0 = no clipping
    beta2: float = 0.999        # AdamW's second-moment decay (PyTorch's default; loopdb's trainer: 0.95)
    warmup_steps: int = 0       # linear lr warmup over this many updates, then constant
    difficulty: int = 12        # every training example has this many elements, every prefix supervised
    start_token: bool = False   # the newline opens every sequence (loopdb's start_token)
    embedded_norm: bool = False  # unit-RMS prelude output before injection (Huginn's sandwich norm gives it)
    sandwich: bool = False      # Huginn's block: a norm after each residual add too, in every block
    mlp: str = "gelu"           # gelu: Linear-GELU-Linear | swiglu: Huginn's gated SiLU MLP (same hidden width)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rotation):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rotation is not None:
            q, k = _rotate(q, *rotation), _rotate(k, *rotation)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


def _rotate(x, cos, sin):
    first, second = x.chunk(2, -1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], -1)


class _GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, value = self.fc(x).chunk(2, -1)
        return self.proj(F.silu(gate) * value)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, sandwich: bool = False, mlp: str = "gelu"):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.post_norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)]) if sandwich else None
        self.attn = _Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        if mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU("tanh"), nn.Linear(hidden, dim, bias=False))
        elif mlp == "swiglu":
            self.mlp = _GatedMLP(dim, hidden)
        else:
            raise ValueError(f"mlp must be gelu or swiglu, got {mlp!r}")

    def forward(self, x, rotation):
        if self.post_norms is not None:
            x = self.post_norms[0](x + self.attn(self.norm1(x), rotation))
            return self.post_norms[1](x + self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x), rotation)
        return x + self.mlp(self.norm2(x))


class MinimalRecurrentLM(nn.Module):
    def __init__(self, settings: MinimalSettings, vocab_size: int):
        super().__init__()
        s, dim = settings, settings.d_model
        self.settings = s
        self.embedding = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(s.context, dim) if s.positions == "learned" else None
        blocks = lambda count: nn.ModuleList(_Block(dim, s.n_heads, s.mlp_ratio, s.sandwich, s.mlp) for _ in range(count))  # noqa: E731
        self.prelude, self.core, self.coda = blocks(s.n_prelude), blocks(s.n_core), blocks(s.n_coda)
        self.adapter = nn.Linear(2 * dim, dim, bias=False)
        self.core_norm, self.final_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.embedded_norm = nn.RMSNorm(dim, eps=1e-6) if s.embedded_norm else None
        head_dim = dim // s.n_heads
        angles = torch.outer(torch.arange(s.context).float(),
                             1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        if s.init == "small":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
        elif s.init != "torch":
            raise ValueError(f"init must be torch or small, got {s.init!r}")

    def _rotation(self, length):
        return None if self.position is not None else (self.cos[:length], self.sin[:length])

    def encode(self, tokens):
        hidden = self.embedding(tokens)
        if self.position is not None:
            hidden = hidden + self.position.weight[:tokens.shape[1]]
        rotation = self._rotation(tokens.shape[1])
        for block in self.prelude:
            hidden = block(hidden, rotation)
        return self.embedded_norm(hidden) if self.embedded_norm is not None else hidden

    def recur(self, state, embedded):
        hidden = self.adapter(torch.cat([state, embedded], -1))
        rotation = self._rotation(state.shape[1])
        for block in self.core:
            hidden = block(hidden, rotation)
        return self.core_norm(hidden)

    def readout(self, state):
        hidden, rotation = state, self._rotation(state.shape[1])
        for block in self.coda:
            hidden = block(hidden, rotation)
        return self.final_norm(hidden) @ self.embedding.weight.t()

    def initial_state(self, embedded, generator):
        noise = torch.randn(embedded.shape, generator=generator)
        return noise * self.settings.state_std

    def forward(self, tokens, loops: int, generator, backprop_depth: int | None = None):
        """Logits (B, T, V) after ``loops`` loops; only the last ``backprop_depth`` carry gradients."""
        embedded = self.encode(tokens)
        state = self.initial_state(embedded, generator)
        detached = 0 if backprop_depth is None else max(0, loops - backprop_depth)
        with torch.no_grad():
            for _ in range(detached):
                state = self.recur(state, embedded)
        for _ in range(loops - detached):
            state = self.recur(state, embedded)
        return self.readout(state)


def draw_depth(settings: MinimalSettings, generator) -> int:
    """Huginn's r = 1 + Poisson(e^tau), tau ~ N(ln(r_bar - 1) - 1/8, 1/2): mean r_bar."""
    if settings.depth_sampler == "fixed" or settings.mean_depth <= 1:
        return max(1, settings.mean_depth)
    tau = torch.randn(1, generator=generator, dtype=torch.float64) * 0.5 + math.log(settings.mean_depth - 1) - 0.125
    return 1 + int(torch.poisson(tau.exp(), generator=generator))


def task_batch(task, difficulty: int, count: int, generator, start_token: bool = False):
    """(inputs, targets) of ``count`` fresh examples drawn with ``generator``: the layout both models train on."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return training_arrays(task, task.generate(seed, difficulty, count), start_token=start_token)


def train_minimal(settings: MinimalSettings, task_name: str = "s3", steps: int = 0, seconds: float = 0.0,
                  seed: int = 0, log=None):
    """Train for ``steps`` updates or ``seconds`` of wall-clock (whichever is given; both: the first
    reached); ``log(line)`` gets the loss every 100 updates. Returns (model, updates, seconds).
    AdamW with beta1 0.9; lr constant after ``warmup_steps`` of linear warmup."""
    if steps <= 0 and seconds <= 0:
        raise ValueError("give steps > 0 or seconds > 0")
    task = get_task(task_name)
    torch.manual_seed(seed)
    model = MinimalRecurrentLM(settings, task.tokenizer().vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, settings.beta2))
    generator = torch.Generator().manual_seed(seed)
    start, updates = time.perf_counter(), 0
    while (steps <= 0 or updates < steps) and (seconds <= 0 or time.perf_counter() - start < seconds):
        if settings.warmup_steps:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * min(1.0, (updates + 1) / settings.warmup_steps)
        inputs, targets = task_batch(task, settings.difficulty, settings.batch_size, generator, settings.start_token)
        logits = model(inputs, draw_depth(settings, generator), generator, settings.backprop_depth)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        updates += 1
        if log is not None and updates % 100 == 0:
            log(f"minimal step {updates} loss {float(loss.detach()):.4f}")
    return model, updates, time.perf_counter() - start


@torch.no_grad()
def task_scores(logits_at, task_name: str, difficulties, count: int, loops, seed: int = 1000,
                start_token: bool = False) -> dict:
    """{K: {"final": final-answer accuracy over ``difficulties``, "positions": accuracy over every
    supervised position}} for ``logits_at(inputs, K) -> (B, T, V)``; ``count`` examples per difficulty
    at the test split's seed (1000), as ``loopdb score --split test`` draws them, in the layout the
    model trained on (``start_token``)."""
    task = get_task(task_name)
    examples = [example for difficulty in difficulties for example in task.generate(seed, difficulty, count)]
    inputs, targets = training_arrays(task, examples, start_token=start_token)
    answer_positions = final_answer_positions(task, examples, start_token)
    scores = {}
    for loops in loops:
        predicted = torch.cat([logits_at(inputs[i:i + 256], loops).argmax(-1) for i in range(0, len(inputs), 256)])
        supervised = targets != IGNORE_INDEX
        final = [bool((predicted[row, where] == targets[row, where]).all()) for row, where in enumerate(answer_positions)]
        scores[loops] = {"final": sum(final) / len(final),
                         "positions": float((predicted == targets)[supervised].float().mean())}
    return scores
