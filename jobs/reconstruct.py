"""Tokenize and reconstruct images with VFMTok; write an (original | reconstruction) PNG grid and the tokens.

With no arguments it runs the ``tiny`` random-weight tokenizer on photos bundled with
scikit-image. Pass ``--tokenizer`` and ``--dinov2`` (local paths or fsspec URLs) and
``--config vfmtok-l14-336`` to use the released weights.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from jobs.cli import UsageError, fail, parse_config, setup_logging
from pipelines.producer.samples import bundled_photos
from vfmtok_core import CONFIGS, VFMTokenizer
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.preprocess import center_crop, to_tensor, to_uint8

log = logging.getLogger("jobs.reconstruct")


@dataclass
class ReconstructConfig:
    """Tokenize and reconstruct images; write a side-by-side PNG grid and the token ids."""

    out: str = field(default="out/reconstruct", metadata={"help": "output folder"})
    images: list[str] = field(default_factory=list, metadata={"help": "image paths or URLs; default: bundled photos"})
    config: str = field(default="tiny", metadata={"help": "tokenizer config", "choices": sorted(CONFIGS)})
    tokenizer: str | None = field(default=None, metadata={"help": "vfmtok-tokenizer.pt (path or fsspec URL)"})
    dinov2: str | None = field(default=None, metadata={"help": "dinov2_vitl14_reg4_pretrain.pth (path or URL)"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights when no checkpoint is given"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    precision: str = field(default="fp32", metadata={"help": "DINOv2/decoder precision", "choices": ["fp32", "bf16"]})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})


def load_images(cfg: ReconstructConfig) -> list[tuple[str, Image.Image]]:
    if not cfg.images:
        return bundled_photos()
    out = []
    for url in cfg.images:
        try:
            with fsspec.open(url, "rb") as f:
                img = Image.open(f)
                img.load()
        except UnidentifiedImageError:
            raise UsageError(f"{url} is not an image PIL can read") from None
        except OSError as e:
            raise UsageError(f"cannot read image {url}: {e.strerror or e}") from None
        out.append((Path(url).stem, img.convert("RGB")))
    return out


def build_tokenizer(cfg: ReconstructConfig) -> VFMTokenizer:
    if cfg.tokenizer:
        return VFMTokenizer.from_pretrained(
            tokenizer=cfg.tokenizer, dinov2=cfg.dinov2, config=cfg.config, device=cfg.device, precision=cfg.precision
        )
    log.warning("no --tokenizer given: using random %r weights (seed %d); reconstructions will be noise", cfg.config, cfg.seed)
    return VFMTokenizer.from_config(cfg.config, seed=cfg.seed, device=cfg.device, precision=cfg.precision)


def side_by_side(originals: np.ndarray, recons: np.ndarray, pad: int = 4) -> Image.Image:
    """One row per image: original | reconstruction, uint8 (N, S, S, 3) each."""
    n, s = originals.shape[:2]
    grid = np.full((n * (s + pad) + pad, 2 * s + 3 * pad, 3), 255, np.uint8)
    for i in range(n):
        y = pad + i * (s + pad)
        grid[y : y + s, pad : pad + s] = originals[i]
        grid[y : y + s, 2 * pad + s : 2 * pad + 2 * s] = recons[i]
    return Image.fromarray(grid)


def run(cfg: ReconstructConfig) -> dict:
    named = load_images(cfg)  # first: a missing image is reported before anything is built or written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(cfg)
    size = tok.config.image_size
    names = [n for n, _ in named]
    crops = np.stack([np.asarray(center_crop(img, size)) for _, img in named])
    codes, recons = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(crops), cfg.batch_size), desc="tokenize+reconstruct", unit="batch"):
        x = to_tensor(crops[i : i + cfg.batch_size])
        c = tok.encode(x)
        codes.append(c.cpu())
        recons.append(to_uint8(tok.decode(c)))
    elapsed = time.perf_counter() - start
    codes_np = torch.cat(codes).numpy()
    side_by_side(crops, np.concatenate(recons)).save(out / "reconstruction.png")
    np.save(out / "tokens.npy", codes_np.astype(np.uint16 if tok.config.quantizer.codebook_size <= 65536 else np.int64))
    summary = {
        "tokenizer": tok.fingerprint,
        "config": tok.config.name,
        "images": names,
        "tokens_per_image": int(codes_np.shape[1]),
        "distinct_codes": int(np.unique(codes_np).size),
        "seconds": round(elapsed, 3),
        "tokens": [{"name": n, "tokens": c.tolist()} for n, c in zip(names, codes_np)],
    }
    (out / "tokens.json").write_text(json.dumps(summary))
    log.info(
        "%d images -> %d tokens each (%d distinct codes) in %.2fs; wrote %s and %s",
        len(names), codes_np.shape[1], summary["distinct_codes"], elapsed,
        out / "reconstruction.png", out / "tokens.json",
    )
    return summary


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_config(ReconstructConfig, argv, description=__doc__)
    try:
        run(cfg)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
        fail(e)


if __name__ == "__main__":
    main()
