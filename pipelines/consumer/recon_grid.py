"""A training run's picture of itself: originals over their reconstructions, as one PNG."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipelines.contract.storage import atomic_write


def grid_image(originals: torch.Tensor, reconstructions: torch.Tensor, limit: int = 8) -> Image.Image:
    """Two rows of up to ``limit`` images (B, 3, S, S) in [-1, 1]: the inputs, then their reconstructions."""
    rows = [t[:limit].detach().float().clamp(-1, 1).cpu() for t in (originals, reconstructions)]
    pixels = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 2S, n*S)
    return Image.fromarray(((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str, fs) -> None:
    buf = io.BytesIO()
    grid_image(originals, reconstructions).save(buf, format="PNG")
    atomic_write(fs, path, buf.getvalue())
