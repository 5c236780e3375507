"""A plain GPT, shaped like nanoGPT's, written for ``loopdb bench speed`` to measure against.

Design: token + learned position embeddings; pre-LayerNorm blocks (no biases) of causal
self-attention through PyTorch SDPA (``is_causal``) and a GELU MLP of width 4d; a final
LayerNorm and a head tied to the token embedding; ``forward(inputs, targets)`` returns the
mean next-token cross-entropy. Nothing else: it is the speed a careful plain
implementation reaches on the same hardware, not a model loopdb trains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=False)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, bias=False)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, context: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """inputs, targets: (B, T) token ids -> the mean cross-entropy of the next tokens."""
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        x = self.token_embedding(inputs) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.final_norm(x) @ self.token_embedding.weight.t()  # tied head, (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
