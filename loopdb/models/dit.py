"""DiT generator on pixels trained with DiffusionBlocks (docs/method.md#vision), and its end-to-end baseline.

Design:
- EDM denoiser: D = c_skip*z + c_out*F(c_in*z; sigma, class), images in [-1, 1];
  sigma_data is the config's (the tiny-dit preset uses EDM's 0.5 for pixels).
- F: linear patch embedding + learned positions, adaLN-Zero layers conditioned on
  sigma embedding + class embedding, DiT's final layer (adaLN shift/scale, zero-initialised
  linear) and unpatchify.
- Classes: ``num_classes`` plus a null class (index num_classes); while training a
  label is replaced by the null class with probability ``label_dropout`` (10%), so
  the same network gives the unconditional D for classifier-free guidance:
  D = D_null + scale * (D_class - D_null) (scale 1 = the conditional model).
- Loss: w(sigma) * mean((D - x)^2) per image.
- diffusion: B blocks, one per step, sigma from its range; each sampler step runs only
  the block that owns its sigma (B times cheaper than the dense network's steps).
- dense: every layer per step, sigma from the whole log-normal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..maths.edm import precondition
from ..layers import RMSNorm, SigmaEmbedder
from .vision import VisionModel, unpatchify


class DiTDenoiser(VisionModel):
    def __init__(self, config: Config, blockwise: bool = True):
        super().__init__(config, blockwise)
        m, dim = config.model, config.model.d_model
        self.null_class = m.num_classes
        self.positions = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.sigma_embedder = SigmaEmbedder(dim)
        self.class_embedding = nn.Embedding(m.num_classes + 1, dim)  # + the null class
        self.final_norm = RMSNorm(dim, affine=False)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_linear = nn.Linear(dim, m.channels * m.patch_size**2)
        for layer in (self.final_modulation, self.final_linear):  # DiT: the output starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, noisy, sigma, labels, block_index: int | None) -> torch.Tensor:
        """noisy (B, C, H, W), sigma (B,), labels (B,) -> D (B, C, H, W)."""
        m = self.config
        pre = precondition(sigma[:, None, None, None], self.sigma_data)
        cond = self.sigma_embedder(pre.c_noise.flatten()) + self.class_embedding(labels)  # (B, d)
        h = self.run_layers(self.patch_tokens(pre.c_in * noisy) + self.positions, cond, block_index)
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        out = self.final_linear(self.final_norm(h) * (1 + scale) + shift)  # (B, N, C*p*p)
        return pre.denoised(noisy, unpatchify(out, m.patch_size, m.channels, m.image_size))

    def guided(self, noisy, sigma, labels, cfg_scale: float, block_index: int | None) -> torch.Tensor:
        """Classifier-free guidance: D_null + scale * (D_class - D_null), one batched pass."""
        null = torch.full_like(labels, self.null_class)
        both = self(torch.cat([noisy, noisy]), torch.cat([sigma, sigma]), torch.cat([labels, null]), block_index)
        conditional, unconditional = both.chunk(2)
        return unconditional + cfg_scale * (conditional - unconditional)
