"""Small building blocks shared by several models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(hidden: int) -> int:
    """Hidden width of a SwiGLU that replaces a GELU MLP of width ``hidden`` (2/3, rounded up to 8)."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``: the xformers/DINOv2 layout of a fused SwiGLU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = swiglu_hidden(hidden)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
