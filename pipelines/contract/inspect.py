"""Summaries of a token dataset, computed with polars from its manifest and shards."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import polars as pl

from pipelines.contract.manifest import MANIFEST
from pipelines.contract.shards import decode_shard
from pipelines.contract.storage import exists, filesystem, join, read_bytes, read_json


def load_manifest(url: str, storage_options: Mapping | None = None) -> dict:
    fs, root = filesystem(url, storage_options)
    path = join(root, MANIFEST)
    if not exists(fs, path):
        raise FileNotFoundError(f"{url} has no {MANIFEST}: not a token dataset, or its first run has not finished")
    return read_json(fs, path)


def _shard_frame(data: bytes, fmt: str) -> pl.DataFrame:
    keys, labels, tokens = decode_shard(data, fmt)
    return pl.DataFrame(
        {"key": keys, "label": [None if x < 0 else int(x) for x in labels], "tokens": tokens.astype(np.uint16)},
        schema_overrides={"label": pl.Int32},
    )


def load_tokens(url: str, storage_options: Mapping | None = None) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    """(manifest, rows with key/label/tokens, rejects) of a token dataset."""
    manifest = load_manifest(url, storage_options)
    fs, root = filesystem(url, storage_options)
    frames = [_shard_frame(read_bytes(fs, join(root, s["path"])), manifest["format"]) for s in manifest["shards"] if s["path"]]
    rows = pl.concat(frames) if frames else pl.DataFrame(schema={"key": pl.String, "label": pl.Int32, "tokens": pl.List(pl.UInt16)})
    rejects = [pl.read_parquet(io.BytesIO(read_bytes(fs, join(root, s["rejects_path"])))) for s in manifest["shards"] if s["rejects_path"]]
    rej = pl.concat(rejects) if rejects else pl.DataFrame(schema={"key": pl.String, "source": pl.String, "reason": pl.String, "error": pl.String})
    return manifest, rows, rej


def summarize(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> dict:
    per_class = rows.group_by("label").len().sort("label")
    counts = rows.select(pl.col("tokens").explode().alias("code")).group_by("code").len()
    total = int(counts["len"].sum()) if counts.height else 0
    probs = (counts["len"].to_numpy() / total) if total else np.array([])
    entropy = float(-(probs * np.log2(probs)).sum()) if total else 0.0
    codebook = manifest["codebook_size"]
    return {
        "images": rows.height,
        "variants": manifest["variants"],
        "shards": len(manifest["shards"]),
        "bytes": manifest["totals"]["bytes"],
        "complete": manifest["complete"],
        "fingerprint": manifest["fingerprint"],
        "classes": {("none" if r["label"] is None else int(r["label"])): int(r["len"]) for r in per_class.iter_rows(named=True)},
        "codes_used": counts.height,
        "codebook_size": codebook,
        "usage": counts.height / codebook,
        "entropy_bits": entropy,
        "max_entropy_bits": math.log2(codebook),
        "rejects_by_reason": {r["reason"]: int(r["len"]) for r in rejects.group_by("reason").len().sort("reason").iter_rows(named=True)},
    }


def usage_histogram(rows: pl.DataFrame, codebook_size: int) -> np.ndarray:
    codes = rows.select(pl.col("tokens").explode()).to_series().to_numpy().astype(np.int64)
    return np.bincount(codes, minlength=codebook_size)


def plot_usage(counts: np.ndarray, path: str, width: int = 1024, height: int = 320) -> None:
    """Code frequencies sorted high to low, as a PNG bar chart (drawn with Pillow)."""
    from PIL import Image, ImageDraw

    ranked = np.sort(counts)[::-1].astype(np.float64)
    bins = np.array_split(ranked, min(width - 60, len(ranked)))
    heights = np.array([b.mean() for b in bins])
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = max(heights.max(), 1.0)
    x0, y0 = 50, height - 30
    for i, h in enumerate(heights):
        y = y0 - (h / top) * (height - 60)
        draw.line([(x0 + i, y0), (x0 + i, y)], fill=(40, 90, 170))
    draw.line([(x0, y0), (width - 5, y0)], fill="black")
    draw.line([(x0, 20), (x0, y0)], fill="black")
    used = int((counts > 0).sum())
    draw.text((x0, 4), f"code usage, ranked: {used}/{len(counts)} codes used, max {int(ranked[0])} hits", fill="black")
    draw.text((x0, y0 + 8), "codes (most to least used)", fill="black")
    img.save(path)
