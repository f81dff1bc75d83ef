"""The ADM crops, with Pillow alone (no torch), so decode workers start quickly."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """BOX-halve while the short side is >= 2*short, then BICUBIC-resize the short side to
    ``short`` (each side becomes ``round(side * short / min_side)``)."""
    while min(img.size) >= 2 * short:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = short / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop(pil_image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: the short side resized to ``size``, then the centre ``size`` square."""
    img = _resize_short_side(pil_image, size)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(pil_image: Image.Image, size: int, rng: np.random.Generator,
                min_frac: float = 0.8, max_frac: float = 1.0) -> Image.Image:
    """ADM random crop (the tokenizer's training augmentation): the short side resized to an
    integer drawn uniformly from ``ceil(size/max_frac) .. ceil(size/min_frac)`` (336 .. 420 at
    336 px), then a uniformly placed ``size`` square. Every draw comes from ``rng``, so a sample's
    crop is a function of the generator's seed alone."""
    short = int(rng.integers(math.ceil(size / max_frac), math.ceil(size / min_frac) + 1))
    img = _resize_short_side(pil_image, short)
    left = int(rng.integers(0, img.size[0] - size + 1))
    top = int(rng.integers(0, img.size[1] - size + 1))
    return img.crop((left, top, left + size, top + size))
