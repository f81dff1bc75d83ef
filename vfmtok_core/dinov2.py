"""DINOv2 vision transformer with register tokens, as a frozen multi-level feature extractor.

Parameter names follow the flat layout of the released ``dinov2_vit*14_reg4_pretrain.pth`` files
(``blocks.N.attn.qkv.weight`` ...), so those files load with strict key matching and no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.config import DinoV2Config
from vfmtok_core.layers import SwiGLUFFN


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # qkv rows are [q; k; v], each split into contiguous heads.
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; ``approximate="tanh"`` for the DINO (v1) ViT of the discriminator."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        dim = cfg.embed_dim
        hidden = int(dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = SwiGLUFFN(dim, hidden) if cfg.ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT-{S,B,L,g}/14 with registers, returning the feature levels VFMTok consumes."""

    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2 + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        # Only used by DINOv2's masked-image training; kept so released files load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.eps)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def interpolated_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid: bicubic, antialiased, computed in fp32.

        Upstream passes a scale factor of ``24/37``; with DINOv2's interpolate offset of 0 that is
        bit-identical to asking for the target size, which also stays exact for non-square grids.
        """
        pos = self.pos_embed
        g = self.cfg.pos_grid
        if h == g and w == g:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        grid = patch_pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images (B, 3, H, W) to [cls, registers, patches]; registers get no position."""
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        patches = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        x = x + self.interpolated_pos_embed(h // p, w // p)
        return torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)

    def forward_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Patch tokens at each configured level and the final-norm cls token.

        Every level but the last is the raw residual stream after its block; the last one is
        taken after the final LayerNorm, as VFMTok does. Blocks past the last level are skipped.

        Returns:
            (levels, cls): ``levels`` is a list of (B, num_patches, dim) tensors.
        """
        levels = self.cfg.levels
        x = self.tokens(x)
        out: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks[: levels[-1] + 1]):
            x = block(x)
            if i in levels[:-1]:
                out.append(x[:, self.num_prefix_tokens :])
        x = self.norm(x)
        out.append(x[:, self.num_prefix_tokens :])
        return out, x[:, 0]
