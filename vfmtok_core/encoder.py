"""Region-adaptive encoder: learnable queries gather multi-level DINOv2 features by deformable attention.

The 256 "carrier" queries sit on a fixed 16x16 grid of reference points. Each of the 6 layers lets
every query sample 4 points per head in each of the 4 feature levels around its reference point,
so a token describes an adaptively shaped region instead of a fixed patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_core.attention import CausalSelfAttention, MSDeformAttn
from vfmtok_core.config import EncoderConfig


class FeatureProjector(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm (Sequential indices 0, 1, 3, 4 as upstream)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False),
            nn.LayerNorm(dim),
            nn.ReLU(),
            nn.Linear(dim, dim, bias=False),
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable cross-attention, causal self-attention, then a ReLU FFN.

    Both attentions run in float32 even under autocast (as upstream): sampling locations and the
    softmax over 16 taps lose too much in bf16. Self-attention takes q, k *and* v from
    ``src + pos`` -- an upstream quirk the released weights were trained with.
    """

    def __init__(self, cfg: EncoderConfig, num_levels: int, backend: str = "auto") -> None:
        super().__init__()
        d = cfg.dim
        self.cross_attn = MSDeformAttn(d, num_levels, cfg.num_heads, cfg.num_points, backend=backend)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = CausalSelfAttention(d, cfg.num_heads)
        self.norm3 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, src, pos, reference_points, value, spatial_shapes, level_start_index):
        with torch.autocast(src.device.type, enabled=False):
            q = (src + pos).float()
            out = self.cross_attn(q, reference_points, value.float(), spatial_shapes, level_start_index)
            src = self.norm1(src.float() + out)
            out = self.self_attn(src + pos.float())
            src = self.norm3(src + out)
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, num_levels: int, backend: str = "auto") -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(cfg, num_levels, backend) for _ in range(cfg.depth))

    def forward(self, src, pos, reference_points, value, spatial_shapes, level_start_index):
        for layer in self.layers:
            src = layer(src, pos, reference_points, value, spatial_shapes, level_start_index)
        return src


def reference_grid(n: int, device=None) -> torch.Tensor:
    """Centres of an n x n grid in row-major order as normalised (x, y): shape (n*n, 2)."""
    c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


class RegionAdaptiveEncoder(nn.Module):
    """DINOv2 levels (list of (B, HW, in_dim)) -> slots (B, num_queries, dim).

    Initialisation quirk kept for training from scratch: upstream's attempt to xavier-initialise
    the deformable layers loops over parameters instead of modules and does nothing, so every Linear
    but the deformable attention's own keeps PyTorch's default init; so do ours.
    """

    def __init__(self, cfg: EncoderConfig, in_dim: int, num_levels: int, backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.carrier_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, d) * d**-0.5)
        self.slots_pos = nn.Parameter(torch.randn(1, cfg.num_queries, d) * d**-0.5)
        self.projectors = nn.ModuleList(FeatureProjector(in_dim, d) for _ in range(num_levels))
        self.norm_layers = nn.ModuleList(nn.LayerNorm(d) for _ in range(num_levels))
        self.norm_pre1 = nn.LayerNorm(d)
        self.transformer = DeformableEncoder(cfg, num_levels, backend)
        grid = int(round(cfg.num_queries**0.5))
        self.register_buffer("reference_points", reference_grid(grid), persistent=False)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        b, hw, _ = levels[0].shape
        side = int(round(hw**0.5))
        if side * side != hw:
            raise ValueError(f"feature levels must be square grids, got {hw} tokens")
        # All levels share the DINOv2 patch grid; they differ in depth, not resolution.
        value = torch.cat([norm(proj(f)) for proj, norm, f in zip(self.projectors, self.norm_layers, levels)], 1)
        n_levels = len(levels)
        spatial_shapes = torch.tensor([[side, side]] * n_levels, dtype=torch.long, device=value.device)
        level_start_index = torch.arange(n_levels, device=value.device) * hw
        ref = self.reference_points[None, :, None, :].expand(b, -1, n_levels, -1)
        src = self.norm_pre1(self.carrier_tokens.expand(b, -1, -1))
        return self.transformer(src, self.slots_pos, ref, value, spatial_shapes, level_start_index)
