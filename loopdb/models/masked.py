"""Masked diffusion language model (MD4) trained with DiffusionBlocks (METHOD 3.3).

Design choices ([ours] where METHOD and the paper are silent):
- Absorbing-state diffusion: a masked token becomes [MASK], id ``vocab_size`` (one extra
  embedding row; the head predicts only the real vocabulary). Linear schedule
  alpha(t) = 1 - t: at time t each position is masked independently with probability t.
- Loss (MD4): -alpha'(t) / (1 - alpha(t)) = 1/t times the sum of the cross-entropy over
  masked positions, per sequence, divided by the sequence length [ours] so it reads in
  nats per token; its expectation over t ~ U(0, 1] is the ELBO per token.
- Network: a bidirectional transformer (no attention mask) of ``n_layers`` adaLN-Zero
  blocks (``layers.Block(conditioned=True)``) conditioned on t through ``SigmaEmbedder``
  fed t itself (its sinusoid scales the input by 1000: DiT's timestep convention);
  shared token embedding, final RMSNorm and head (tied to the embedding's real-token rows
  by default, ``tie_head``).
- DiffusionBlocks: the n_layers form ``num_blocks`` contiguous blocks. Equal alpha
  decrements per block: with the linear schedule t_b = b/B. Block 0 (the input side,
  first to run when sampling) owns the most-masked range (1 - 1/B, 1]; block b owns
  (t_{B-1-b}, t_{B-b}], a boundary going to the block of the lower range. Boundaries come
  from num_blocks on every call, never stored.
- Training (objective=diffusion): one block per step, uniformly (the whole batch uses it);
  t stratified over the batch inside its range widened by ``block_overlap`` x its width
  on each side, clipped to [0, 1] (edm.NoiseSchedule.block_range, with t in place of
  log sigma). The block reads the masked token embedding itself, never another block's
  output, and only its layers run, so only its parameters (and the shared ones) get
  gradients. objective=dense: every layer stacked, t stratified over (0, 1].
- ELBO: -log p(x) <= int_0^1 (1/t) E[sum over masked CE] dt, each t scored by the block
  that owns it. Estimated with a FIXED number of draws per window (``ELBO_T_SAMPLES`` =
  16, seeded): draw k takes m in {1..L} masked positions, stratified (m = 1 + floor(u_k L),
  u_k = (k + v)/K), a uniformly random set of them and t ~ Beta(m, L - m + 1) (the m-th
  smallest of L uniforms; t is uniform on (0, 1] overall); the estimate (L/m) * sum over
  masked CE is unbiased for the bound (integrate t out per mask size) and equals exactly
  L log V for a model that predicts uniformly. Bits per byte = nats / ln 2 / bytes.
- Sampler (MD4, ancestral): from an all-mask sequence (after an optional fixed prompt),
  T steps on t_i = 1 - i/T; from t to s each still-masked position is unmasked with
  probability (t - s)/t, its token drawn from the model at t (the block that owns t).
  Unmasked tokens never change; the last step (s = 0) unmasks every position.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiffusionConfig, ModelConfig
from ..readouts.scoring import same_length_batches
from ..layers import Block, RMSNorm, Rotary, SigmaEmbedder, init_weights

ELBO_T_SAMPLES = 16  # draws per window in the ELBO (fixed, so numbers compare across runs)
SAMPLE_STEPS = 64    # default sampler steps


# -- schedule and partition ----------------------------------------------------------------------
def alpha(t):
    """Linear schedule: the probability that a token is still unmasked at time t."""
    return 1.0 - t


def time_partition(num_blocks: int) -> list[float]:
    """Ascending t boundaries 0 = t_0 < ... < t_B = 1 with equal alpha decrements:
    alpha(t_b) - alpha(t_{b+1}) = 1/B, i.e. t_b = alpha^-1(1 - b/B) = b/B."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return [b / num_blocks for b in range(num_blocks + 1)]


def block_range(boundaries: list[float], block_index: int, overlap: float = 0.0) -> tuple[float, float]:
    """Training t-range of a block, widened by ``overlap`` x its width on each side (clipped to [0, 1]).
    Block 0 is nearest the INPUT and owns the HIGHEST (most masked) range."""
    num_blocks = len(boundaries) - 1
    if not 0 <= block_index < num_blocks:
        raise ValueError(f"block_index {block_index} out of range for {num_blocks} blocks")
    lo, hi = boundaries[num_blocks - 1 - block_index], boundaries[num_blocks - block_index]
    width = hi - lo
    return max(0.0, lo - overlap * width), min(1.0, hi + overlap * width)


def block_for_time(boundaries: list[float], t: float) -> int:
    """The block that owns t at inference (no overlap; a boundary goes to the lower range's block)."""
    num_blocks = len(boundaries) - 1
    for block_index in range(num_blocks):  # ranges from the top down
        if t > boundaries[num_blocks - 1 - block_index]:
            return block_index
    return num_blocks - 1


def stratified_times(count: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` times in (lo, hi], one per equal stratum (MD4's low-discrepancy sampler)."""
    u = (torch.arange(count, dtype=torch.float64) + torch.rand(1, generator=generator, dtype=torch.float64)) / count
    return (hi - u * (hi - lo)).float()


# -- the network -----------------------------------------------------------------------------------
class MaskedDiffusionLM(nn.Module):
    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, objective):
        super().__init__()
        self.config, self.diffusion = model, diffusion
        self.objective = objective  # MaskedDiffusionObjective or MaskedDenseObjective; a plain object
        self.vocab_size, self.mask_id = model.vocab_size, model.vocab_size
        self.num_blocks, self.layers_per_block = model.num_blocks, model.n_layers // model.num_blocks
        dim = model.d_model
        self.embedding = nn.Embedding(model.vocab_size + 1, dim)  # the last row is [MASK]
        self.layers = nn.ModuleList(Block(dim, model.n_heads, model.mlp_ratio, conditioned=True,
                                          backend=model.attention) for _ in range(model.n_layers))
        self.rotary = Rotary(dim // model.n_heads, model.context)
        self.time_embedder = SigmaEmbedder(dim)
        self.final_norm = RMSNorm(dim)
        self.head = None if model.tie_head else nn.Linear(dim, model.vocab_size, bias=False)
        init_weights(self)

    @property
    def boundaries(self) -> list[float]:
        return time_partition(self.num_blocks)

    def block_layers(self, block_index: int | None):
        """The contiguous layers of one block (block 0 first), or every layer for None (dense)."""
        if block_index is None:
            return self.layers
        start = block_index * self.layers_per_block
        return self.layers[start:start + self.layers_per_block]

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, block_index: int | None = None) -> torch.Tensor:
        """tokens: (B, L) with [MASK] ids; t: (B,). Logits (B, L, V) over the real vocabulary from the
        masked token embedding through ONE block's layers (or all of them for block_index None)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rotary(positions)
        cond = self.time_embedder(t)  # (B, C)
        hidden = self.embedding(tokens)  # (B, L, C)
        for layer in self.block_layers(block_index):
            hidden, _ = layer(hidden, cos, sin, cond=cond, causal=False)
        hidden = self.final_norm(hidden)
        if self.head is None:
            return hidden @ self.embedding.weight[:self.vocab_size].t()
        return self.head(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- objectives ------------------------------------------------------------------------------------
def md4_loss(model, tokens: torch.Tensor, t: torch.Tensor, block_index: int | None, generator: torch.Generator):
    """MD4's loss at times t (B,): mask each position with probability t, then
    (1/t) * sum over masked positions of CE, per sequence, / L. Returns (loss, mean masked CE)."""
    masked = (torch.rand(tokens.shape, generator=generator) < t[:, None].cpu()).to(tokens.device)
    logits = model(tokens.masked_fill(masked, model.mask_id), t, block_index)
    cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    masked_ce = (cross_entropy * masked).sum(1)  # (B,)
    loss = (masked_ce / t / tokens.shape[1]).mean()  # weight -alpha'(t) / (1 - alpha(t)) = 1/t
    return loss, masked_ce.sum().detach() / masked.sum().clamp(min=1)


class MaskedDiffusionObjective:
    """DiffusionBlocks: each step trains one block, uniformly drawn, on t inside its range."""

    name = "diffusion"
    has_loops = False

    def training_block(self, model, generator) -> tuple[int | None, float, float]:
        block_index = int(torch.randint(model.num_blocks, (1,), generator=generator))
        return (block_index, *block_range(model.boundaries, block_index, model.diffusion.block_overlap))

    def block_for(self, model, t: float) -> int | None:
        return block_for_time(model.boundaries, t)

    def loss(self, model, tokens: torch.Tensor, generator: torch.Generator, step: int = 0):
        """tokens: (B, L) clean windows. All randomness comes from ``generator``."""
        block_index, lo, hi = self.training_block(model, generator)
        t = stratified_times(tokens.shape[0], lo, hi, generator).to(tokens.device)
        loss, masked_ce = md4_loss(model, tokens, t, block_index, generator)
        stats = {"ce": masked_ce}
        if block_index is not None:
            stats["block"] = torch.tensor(float(block_index))
        return loss, stats


class MaskedDenseObjective(MaskedDiffusionObjective):
    """The end-to-end baseline: every layer stacked, trained at every t in (0, 1]."""

    name = "dense"

    def training_block(self, model, generator):
        return None, 0.0, 1.0

    def block_for(self, model, t: float) -> None:
        return None


def make_masked_objective(objective: str):
    if objective == "diffusion":
        return MaskedDiffusionObjective()
    if objective == "dense":
        return MaskedDenseObjective()
    raise ValueError(f"the mdm family trains with objective diffusion or dense, not {objective!r}")


def owned_logits(model, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) with each row run by the block that owns its t."""
    owners = [model.objective.block_for(model, float(value)) for value in t]
    logits = None
    for block_index in dict.fromkeys(owners):
        rows = torch.tensor([i for i, owner in enumerate(owners) if owner == block_index], device=tokens.device)
        part = model(tokens[rows], t[rows], block_index)
        if logits is None:
            logits = part.new_empty((*tokens.shape, part.shape[-1]))
        logits[rows] = part
    return logits


# -- the ELBO ----------------------------------------------------------------------------------------
@torch.no_grad()
def elbo_nats(model, windows: torch.Tensor, t_samples: int = ELBO_T_SAMPLES,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) upper bound on -log p(window) in nats, for windows (B, L): the mean of ``t_samples``
    stratified draws of (L/m) * sum over the m masked positions of CE (module docstring)."""
    if t_samples < 1:
        raise ValueError(f"t_samples must be >= 1, got {t_samples}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch, length = windows.shape
    offset = torch.rand(batch, generator=generator, dtype=torch.float64)
    total = torch.zeros(batch, dtype=torch.float64)
    for k in range(t_samples):
        num_masked = ((k + offset) / t_samples * length).long().clamp(max=length - 1) + 1  # stratified in 1..L
        scores = torch.rand(batch, length, generator=generator)
        t = scores.sort(dim=1).values.gather(1, (num_masked - 1)[:, None])  # m-th smallest: Beta(m, L - m + 1)
        masked = (scores <= t).to(windows.device)  # exactly the m smallest
        logits = owned_logits(model, windows.masked_fill(masked, model.mask_id), t[:, 0].to(windows.device))
        cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), windows.flatten(),
                                        reduction="none").view(batch, length)
        total += (length / num_masked) * (cross_entropy * masked).sum(1).double().cpu()
    return total / t_samples


@torch.no_grad()
def elbo_bits_per_byte(model, windows: list[torch.Tensor], token_bytes: torch.Tensor,
                       t_samples: int = ELBO_T_SAMPLES, seed: int = 0, batch_size: int = 16, device="cpu",
                       progress=None) -> dict:
    """ELBO over ``windows`` (each (L,) tokens, all scored): {"bpb", "nats", "tokens", "bytes"}.
    Same seed -> same masks and times -> same number."""
    generator = torch.Generator().manual_seed(seed)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for batch in same_length_batches(windows, batch_size, device, progress):
        total_nats += elbo_nats(model, batch, t_samples, generator).sum().item()
        total_bytes += int(token_bytes[batch.cpu()].sum())
        total_tokens += batch.numel()
    return {"bpb": total_nats / math.log(2) / max(total_bytes, 1), "nats": total_nats, "tokens": total_tokens,
            "bytes": total_bytes}


# -- the sampler ---------------------------------------------------------------------------------------
def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """One token per position from logits (B, L, V); temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).flatten(0, 1).cpu()
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


@torch.no_grad()
def sample(model, length: int, num_steps: int = SAMPLE_STEPS, prompt: list[int] = (), num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_samples, length) token ids: ``num_steps`` ancestral unmasking steps from an all-mask
    sequence whose first tokens are fixed to ``prompt``; each step runs the block that owns its t."""
    if num_steps < 1:
        raise ValueError(f"the number of sampler steps must be >= 1, got {num_steps}")
    if not len(prompt) <= length <= model.config.context:
        raise ValueError(f"cannot sample {length} tokens after a {len(prompt)}-token prompt with a "
                         f"{model.config.context}-token model")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    tokens = torch.full((num_samples, length), model.mask_id, dtype=torch.long, device=device)
    tokens[:, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
    for step in range(num_steps):
        t, s = (num_steps - step) / num_steps, (num_steps - step - 1) / num_steps  # exact on the b/B boundaries
        masked = tokens == model.mask_id
        if not masked.any():
            break
        times = torch.full((num_samples,), t, device=device)
        proposal = _draw(model(tokens, times, model.objective.block_for(model, t)), temperature, top_k, generator)
        reveal = masked & (torch.rand(tokens.shape, generator=generator) < (t - s) / t).to(device)
        tokens = torch.where(reveal, proposal, tokens)
    return tokens
