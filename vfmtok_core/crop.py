"""The ADM centre crop, with Pillow alone (no torch), so decode workers start quickly."""

from __future__ import annotations

from PIL import Image


def center_crop(pil_image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: BOX-halve while the short side is >= 2*size, BICUBIC-resize the short side
    to ``size`` (each side becomes ``round(side * size / short)``), then crop the centre.
    """
    img = pil_image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))
