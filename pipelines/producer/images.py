"""Decoding untrusted image bytes to RGB and cutting the crop variants that get tokenized.

Every failure is a :class:`Rejected` with a short machine-readable reason, so the pipeline records
it and moves on. Variants are pure functions of the decoded image: the same bytes give the same
crops whatever batch, worker or shard they travel in.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vfmtok_core.crop import center_crop

VARIANT_SETS = {
    "center": ("center",),
    "flip": ("flip",),
    "tencrop": tuple(f"tencrop{i}" for i in range(10)),
}
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger inputs are rejected as decompression bombs
MIN_SIDE = 8
# Ten-crop as LlamaGen extracts it: ADM centre crop to 1.1x the size, then torchvision's TenCrop.
TENCROP_SCALE = 1.1


class Rejected(Exception):
    """An input that cannot be tokenized; ``reason`` is a short category, the message the detail."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def expand_variants(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``["center", "tencrop"]`` -> ``("center", "tencrop0", ..., "tencrop9")``; order is kept."""
    out: list[str] = []
    for name in names:
        if name not in VARIANT_SETS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANT_SETS)}")
        out.extend(VARIANT_SETS[name])
    if len(set(out)) != len(out):
        raise ValueError(f"variants repeat: {names}")
    return tuple(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white; 16/32-bit greys are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Untrusted bytes -> RGB image, EXIF orientation applied; raises :class:`Rejected`."""
    if not data:
        raise Rejected("empty", "zero-length input")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # read from the header, before any pixel is decoded
            if w * h > max_pixels:
                raise Rejected("too_large", f"{w}x{h} = {w * h} pixels exceeds the {max_pixels} limit")
            if min(w, h) < MIN_SIDE:
                raise Rejected("too_small", f"{w}x{h} is below the {MIN_SIDE}-pixel minimum side")
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise Rejected("not_an_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt streams
        raise Rejected("corrupt", f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as e:  # noqa: BLE001 - exotic modes and broken EXIF must not stop the job
        raise Rejected("corrupt", f"cannot convert {img.mode} image: {type(e).__name__}: {e}") from None


def tencrop_size(size: int) -> int:
    return int(size * TENCROP_SCALE)


def _five_crop_corners(big: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of torchvision's five_crop on a square of side ``big``: top-left, top-right,
    bottom-left, bottom-right, centre."""
    mid = int(round((big - size) / 2.0))
    far = big - size
    return [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def variant_windows(size: int, variants: tuple[str, ...]) -> list[tuple[str, bool, int, int]]:
    """How each variant is cut from a *source* crop: (source, mirrored first, top, left).

    Sources are ``center`` (the ADM centre crop at ``size``) and ``tencrop`` (the centre crop at
    1.1x). Every variant is a window of a source, possibly mirrored, so only the sources need to
    travel from the CPU workers to the tokenizer, which cuts the variants on its device.
    """
    corners = _five_crop_corners(tencrop_size(size), size)
    table = {"center": ("center", False, 0, 0), "flip": ("center", True, 0, 0)}
    table.update({f"tencrop{i}": ("tencrop", i >= 5, *corners[i % 5]) for i in range(10)})
    return [table[v] for v in variants]


def source_crops(img: Image.Image, size: int, variants: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The uint8 (H, W, 3) source crops that ``variants`` are cut from (see :func:`variant_windows`)."""
    needed = {source for source, *_ in variant_windows(size, variants)}
    sides = {"center": size, "tencrop": tencrop_size(size)}
    return {name: np.asarray(center_crop(img, sides[name])) for name in sorted(needed)}


def cut_variants(sources: dict, size: int, variants: tuple[str, ...], mirror) -> list:
    """Variants of a batch of sources (each (N, H, W, 3)), in the order of ``variants``.
    ``mirror`` flips (N, H, W, 3) left-right: a NumPy view, or ``torch.flip`` on a device."""
    mirrored: dict = {}
    out = []
    for source, flipped, top, left in variant_windows(size, variants):
        arr = sources[source]
        if flipped:
            arr = mirrored.setdefault(source, mirror(arr))
        out.append(arr[:, top : top + size, left : left + size])
    return out


def make_variants(img: Image.Image, size: int, variants: tuple[str, ...]) -> np.ndarray:
    """uint8 (V, size, size, 3) crops of an RGB image, in the order of ``variants``."""
    sources = {k: v[None] for k, v in source_crops(img, size, variants).items()}
    return np.ascontiguousarray(np.stack(cut_variants(sources, size, variants, lambda a: a[:, :, ::-1]), axis=1)[0])
