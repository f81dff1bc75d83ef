"""Decoder transformer: quantised slots -> a patch grid for the pixel decoder (and DINOv2 features).

The sequence is [256 slots | cls, mask tokens, registers] under one causal mask, so image tokens
read every slot but slots never read the image side. Registers sit last and therefore influence
nothing; their parameters are kept only so released checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.attention import CausalSelfAttention
from vfmtok_core.config import DecoderConfig
from vfmtok_core.layers import SwiGLUFFN


class DecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + swiglu(norm2(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn1 = CausalSelfAttention(cfg.dim, cfg.num_heads, dropout=cfg.attn_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffnet = SwiGLUFFN(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        return x + self.ffnet(self.norm2(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderTransformer(nn.Module):
    def __init__(self, cfg: DecoderConfig, num_slots: int, feature_grid: int, grid: int, feature_dim: int) -> None:
        """
        Args:
            num_slots: quantised tokens per image (256).
            feature_grid: DINOv2 patch grid side (24); the stored position table covers it.
            grid: side of the patch grid handed to the pixel decoder (21 = 336 / 16).
            feature_dim: DINOv2 width predicted by the semantic head (1024).
        """
        super().__init__()
        d = cfg.dim
        self.num_slots, self.feature_grid, self.grid = num_slots, feature_grid, grid

        def table(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * d**-0.5)

        self.position_embedding = table(1, feature_grid**2 + 1, d)
        self.slot_position_embedding = table(1, num_slots, d)
        self.mask_embedding = table(1, 1, d)
        self.mask_dino = table(1, 1, d)
        self.cls_token = table(1, 1, d)
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        self.transformer = DecoderStack(cfg)
        self.norm_post1 = nn.LayerNorm(d)
        self.norm_post2 = nn.LayerNorm(d)
        self.proj = nn.Linear(d, feature_dim)
        # Upstream xavier-initialises every Linear here (biases zero); it matters only when training
        # from scratch, as loaded weights replace it.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pixel_positions(self) -> torch.Tensor:
        """Positions of the decoder grid, resized bicubically from the DINOv2 grid.

        Upstream resizes with ``scale_factor=(grid + 0.1) / feature_grid`` (21.1 / 24), not with
        ``size=grid``: PyTorch maps coordinates with the given scale, so the two differ and only the
        scale-factor form reproduces the released weights' behaviour.
        """
        g, fg = self.grid, self.feature_grid
        patch = self.position_embedding[:, 1:].reshape(1, fg, fg, -1).permute(0, 3, 1, 2)
        scale = (g + 0.1) / fg
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        if patch.shape[-2:] != (g, g):
            raise RuntimeError(f"position grid resized to {tuple(patch.shape[-2:])}, expected {(g, g)}")
        return patch.flatten(2).transpose(1, 2)

    def _run(self, slots: torch.Tensor, image_side: torch.Tensor, norm: nn.LayerNorm, n_out: int) -> torch.Tensor:
        b = slots.shape[0]
        memory = self.norm_post1(slots + self.slot_position_embedding)
        x = torch.cat([memory, norm(image_side).expand(b, -1, -1)], dim=1)
        x = self.transformer(x)
        start = self.num_slots + 1  # skip the slots and the cls token
        return x[:, start : start + n_out]

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Pixel branch: slots (B, N, d) -> (B, d, grid, grid)."""
        pos = self.position_embedding
        image_side = torch.cat(
            [
                self.cls_token + pos[:, :1],
                self.mask_embedding + self.pixel_positions(),
                self.register_tokens,
            ],
            dim=1,
        )
        out = self._run(slots, image_side, self.norm_post1, self.grid**2)
        return out.transpose(1, 2).reshape(slots.shape[0], -1, self.grid, self.grid)

    def semantic(self, slots: torch.Tensor) -> torch.Tensor:
        """Semantic branch (training target: DINOv2's last layer): slots -> (B, feature_grid^2, feature_dim)."""
        pos = self.position_embedding
        image_side = torch.cat(
            [self.cls_token + pos[:, :1], self.mask_dino + pos[:, 1:], self.register_tokens], dim=1
        )
        return self.proj(self._run(slots, image_side, self.norm_post2, self.feature_grid**2))
