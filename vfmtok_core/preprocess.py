"""Image preprocessing that matches the official VFMTok pipeline bit for bit where it can.

- :func:`center_crop` is the ADM centre crop used for evaluation (and by our tokenization job).
- :func:`resize_for_encoder` is the bicubic resize the tokenizer applies to its input tensors
  (kornia's ``resize`` with ``align_corners=True`` and Gaussian anti-aliasing when shrinking).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vfmtok_core.crop import center_crop

__all__ = ["center_crop", "resize_for_encoder", "resize_output", "to_tensor", "to_uint8"]


def to_tensor(images: np.ndarray | Image.Image | list) -> torch.Tensor:
    """uint8 RGB (H, W, 3), (B, H, W, 3) or PIL images -> float32 (B, 3, H, W) in [-1, 1].

    ``u8 / 127.5 - 1`` is bitwise equal to torchvision's ``Normalize(0.5, 0.5)(ToTensor()(img))``.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (B, H, W, 3), got {arr.dtype} {arr.shape}")
    return normalize(torch.from_numpy(arr))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> float32 (B, 3, H, W) in [-1, 1], the same bits as
    :func:`to_tensor` (elementwise IEEE arithmetic), so crops can be normalised where they are encoded."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3), as upstream: clamp(127.5x + 128), truncated."""
    out = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def _gaussian_kernel(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, ks: tuple[int, int], sigmas: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (kornia's ``gaussian_blur2d``)."""
    b, c, h, w = x.shape
    ky = _gaussian_kernel(ks[0], sigmas[0], x.device, x.dtype)
    kx = _gaussian_kernel(ks[1], sigmas[1], x.device, x.dtype)
    kernel = (ky[:, None] * kx[None, :]).expand(c, 1, -1, -1)
    py, px = ks[0] // 2, ks[1] // 2
    x = F.pad(x, (px, px, py, py), mode="reflect")
    return F.conv2d(x, kernel, groups=c)


def resize_for_encoder(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) to (size, size) as the official tokenizer does before DINOv2.

    Identity when already at size; otherwise bicubic with ``align_corners=True``, preceded by a
    Gaussian blur when shrinking (sigma = (factor - 1) / 2, kernel about 4 sigma, odd).
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    factors = (h / size, w / size)
    if max(factors) > 1:
        sigmas = (max((factors[0] - 1.0) / 2.0, 0.001), max((factors[1] - 1.0) / 2.0, 0.001))
        ks = [int(max(4.0 * s, 3)) for s in sigmas]
        ks = tuple(k + 1 if k % 2 == 0 else k for k in ks)
        images = _blur(images, ks, sigmas)
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=True)


def resize_output(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize decoded images as upstream's ``decode_codes_to_img``: bicubic, no antialias, no clamp."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)

