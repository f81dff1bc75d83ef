"""Attention layers shared by the tokenizer's encoder and decoder transformers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections and a lower-triangular mask.

    Upstream's ``Attention3``: query i attends to positions <= i. Dropout applies to the attention
    probabilities in training only.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), computed by :func:`kernels.ms_deform_attn`.

    Each query predicts, per head, level and point, an offset from its reference point (in units
    of that level's cells) and an attention weight (softmax over levels x points).
    """

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, offset biases fanning out in 8 directions."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        dirs = torch.stack([theta.cos(), theta.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        dirs = dirs.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        dirs = dirs * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(dirs.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """query (B, Lq, C), reference_points (B, Lq, L, 2) normalised (x, y), value (B, S, C)."""
        b, lq, c = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(b, value.shape[1], m, c // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, lq, m, lv * p).softmax(-1).view(b, lq, m, lv, p)
        # Offsets are in cells of each level: divide by (W, H) to get normalised coordinates.
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = kernels.ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)
