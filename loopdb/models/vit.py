"""ViT classifier trained with DiffusionBlocks (docs/method.md#vision), and its end-to-end baseline.

Design:
- Patch embedding (linear on p x p patches) plus learned absolute positions; the token
  in front of the patches is the noisy label embedding z (it replaces the CLS token).
- Label targets y = rows of the L2-normalised label table scaled to ``target_norm``
  (default sigma_data * sqrt(d): per-dimension scale sigma_data, docs/method.md#target-scale), exactly
  like the looped LM's targets. Dhat = softmax(logits) @ that SAME table (docs/method.md#edm).
- Denoiser (EDM): D = c_skip*z + c_out*out(norm(h_0)), h_0 the label token after the
  block's layers; logits = head(D / target_scale); loss w(sigma) * CE(logits, label).
- diffusion: B blocks, one per step, sigma from its range; inference with T steps,
  each run by the block that owns its sigma (T = B: each block once).
- dense: the same layers in one pass on [learned CLS ; patches] with a learned
  constant conditioning, plain CE; T is ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..maths.edm import precondition
from ..layers import RMSNorm, SigmaEmbedder
from .vision import VisionModel


class ViTClassifier(VisionModel):
    def __init__(self, config: Config, blockwise: bool = True):
        super().__init__(config, blockwise)
        m, dim = config.model, config.model.d_model
        self.target_norm = config.diffusion.target_norm or self.sigma_data * dim**0.5
        self.target_scale = self.target_norm / dim**0.5  # per-dimension scale of the targets
        self.positions = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)  # label token first
        self.label_table = nn.Embedding(m.num_classes, dim)
        self.sigma_embedder = SigmaEmbedder(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))         # dense only
        self.dense_condition = nn.Parameter(torch.zeros(dim))          # dense only: the adaLN input
        self.norm = RMSNorm(dim)
        self.out = nn.Linear(dim, dim)  # F's output projection
        self.head = nn.Linear(dim, m.num_classes)

    # -- targets and the estimate built from logits (the SAME table) ----------------------------
    def target_table(self) -> torch.Tensor:
        return F.normalize(self.label_table.weight, dim=-1) * self.target_norm  # (K, C)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return self.target_table()[labels]

    def soft_denoised(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1) @ self.target_table().float()

    # -- the denoiser ----------------------------------------------------------------------------
    def forward(self, images, noisy, sigma, block_index: int | None) -> torch.Tensor:
        """images (B, C, H, W), noisy label tokens (B, d), sigma (B,) -> logits (B, K)."""
        pre = precondition(sigma[:, None], self.sigma_data)
        cond = self.sigma_embedder(pre.c_noise[:, 0])  # (B, d)
        x = torch.cat([(pre.c_in * noisy)[:, None], self.patch_tokens(images)], dim=1) + self.positions
        h = self.run_layers(x, cond, block_index)[:, 0]  # the label token
        return self.head(pre.denoised(noisy, self.out(self.norm(h))) / self.target_scale)

    def dense_logits(self, images) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(len(images), -1, -1), self.patch_tokens(images)], 1) + self.positions
        cond = self.dense_condition.expand(len(images), -1)
        return self.head(self.out(self.norm(self.run_layers(x, cond, None)[:, 0])))
