"""Sample images from a class-conditional GPT and decode them with the VFMTok tokenizer.

Two outputs:
- ``--classes 207,360,387 --out grid.png``: a labelled PNG grid, one row per class;
- ``--num N --out samples.npz``: N samples in the ADM evaluator format (``arr_0`` uint8 NHWC at
  ``--image-size``, bicubic-resized from the tokenizer's 336 as upstream; ``arr_1`` the labels),
  class-balanced (N / classes each, shuffled) or, as upstream, uniformly random (``--labels random``).

The ``.npz`` is sampled in chunks of ``--batch-size``, each seeded by (seed, chunk), on Ray actors
(``--workers``: one per GPU, or CPU actors), on ``torchrun`` ranks, or in this process. The bytes
depend on the seed and the chunk size only, not on how many workers computed them; finished chunks
are kept beside the output (``<out>.parts/``) so a crashed run resumes where it stopped.

Without ``--gpt`` / ``--tokenizer`` it uses random GPT-tiny and tiny-tokenizer weights (a smoke run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from jobs.cli import UsageError, fail, parse_config, setup_logging
from jobs.sample_npz import sample_npz
from vfmtok_core import CONFIGS, VFMTokenizer
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.generate import compiled_decode, generate
from vfmtok_core.gpt import GPT, GPT_CONFIGS
from vfmtok_core.preprocess import to_uint8

log = logging.getLogger("jobs.sample")


@dataclass
class SampleConfig:
    """Sample class-conditional images: a labelled PNG grid or an ADM-format .npz."""

    out: str = field(default="out/samples.png", metadata={"help": "output .png (grid) or .npz (with --num)"})
    gpt: str | None = field(default=None, metadata={"help": "GPT checkpoint (path or fsspec URL)"})
    size: str = field(default="GPT-tiny", metadata={"help": "GPT size", "choices": sorted(GPT_CONFIGS)})
    tokenizer: str | None = field(default=None, metadata={"help": "vfmtok-tokenizer.pt (path or fsspec URL)"})
    dinov2: str | None = field(
        default=None, metadata={"help": "DINOv2 .pth; optional: sampling only decodes, so without it DINOv2 is skipped"}
    )
    config: str = field(default="tiny", metadata={"help": "tokenizer config", "choices": sorted(CONFIGS)})
    classes: str = field(default="207,360,387,974,88,979", metadata={"help": "comma-separated class ids for the grid"})
    per_class: int = field(default=4, metadata={"help": "grid samples per class"})
    num: int = field(default=0, metadata={"help": "write this many samples to an ADM .npz instead (50000 for the FID protocol); "
                                                  "under torchrun spell it --num-samples (torchrun takes --num for its --numa-binding)",
                                          "aliases": ["--num-samples"]})
    labels: str = field(default="balanced", metadata={"help": "with --num: num/classes per class, shuffled; or uniformly random as upstream", "choices": ["balanced", "random"]})
    workers: int = field(default=0, metadata={"help": "with --num: Ray actors sampling chunks (0: this process, or the torchrun ranks)"})
    batch_size: int = field(default=32, metadata={"help": "sequences generated at once (with --num: the seeded chunk, which the samples depend on)"})
    cfg_scale: float = field(default=4.0, metadata={"help": "classifier-free guidance scale (<= 1: CFG-free)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass (1: all)"})
    greedy: bool = field(default=False, metadata={"help": "argmax instead of sampling"})
    seed: int = field(default=0, metadata={"help": "sampling seed (and random-weight seed)"})
    image_size: int = field(default=256, metadata={"help": "output resolution (upstream evaluates at 256)"})
    precision: str = field(default="fp32", metadata={"help": "GPT weights dtype", "choices": ["fp32", "bf16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (pays off on a GPU)"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})


def build_models(cfg: SampleConfig) -> tuple[GPT, VFMTokenizer]:
    gpt = GPT.from_pretrained(cfg.gpt, size=cfg.size) if cfg.gpt else None  # first: the file most likely mistyped
    if cfg.tokenizer:
        tok = VFMTokenizer.from_pretrained(
            tokenizer=cfg.tokenizer, dinov2=cfg.dinov2, config=cfg.config, decoder_only=cfg.dinov2 is None
        )
    else:
        log.warning("no --tokenizer: random %r decoder weights (seed %d)", cfg.config, cfg.seed)
        tok = VFMTokenizer.from_config(cfg.config, seed=cfg.seed)
    vocab = tok.config.quantizer.codebook_size
    if gpt is None:
        log.warning("no --gpt: random %s weights (seed %d)", cfg.size, cfg.seed)
        gpt = GPT.from_config(cfg.size, seed=cfg.seed, vocab_size=vocab)
    if gpt.config.vocab_size != vocab:
        raise UsageError(f"GPT vocabulary {gpt.config.vocab_size} != tokenizer codebook {vocab}")
    if gpt.config.block_size != tok.config.tokens_per_image:
        raise UsageError(f"GPT block size {gpt.config.block_size} != tokens per image {tok.config.tokens_per_image}")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    return gpt.to(cfg.device, dtype), tok.to(cfg.device)


def sample_images(cfg: SampleConfig, gpt: GPT, tok: VFMTokenizer, labels: torch.Tensor) -> np.ndarray:
    """uint8 (N, S, S, 3) images for ``labels``, generated in batches with one seeded generator."""
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    decode_fn = compiled_decode(gpt) if cfg.compile else None
    out = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(labels), cfg.batch_size), desc="sampling", unit="batch"):
        batch = labels[i : i + cfg.batch_size].to(cfg.device)
        codes = generate(
            gpt, batch, cfg.cfg_scale, cfg.temperature, cfg.top_k, cfg.top_p, cfg.greedy, gen, decode_fn=decode_fn
        )
        out.append(to_uint8(tok.decode(codes, size=cfg.image_size)))
    elapsed = time.perf_counter() - start
    log.info("%d images in %.1fs (%.2f images/s)", len(labels), elapsed, len(labels) / elapsed)
    return np.concatenate(out)


def labelled_grid(images: np.ndarray, labels: list[int], per_row: int, pad: int = 4, band: int = 14) -> Image.Image:
    rows = (len(images) + per_row - 1) // per_row
    s = images.shape[1]
    canvas = Image.new("RGB", (per_row * (s + pad) + pad, rows * (s + pad + band) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        x = pad + (i % per_row) * (s + pad)
        y = pad + (i // per_row) * (s + pad + band)
        draw.text((x, y), f"class {label}", fill="black")
        canvas.paste(Image.fromarray(img), (x, y + band))
    return canvas


def run(cfg: SampleConfig) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.num > 0:
        return Path(sample_npz(cfg, build_models, GPT_CONFIGS[cfg.size].num_classes))
    gpt, tok = build_models(cfg)
    try:
        classes = [int(c) for c in cfg.classes.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes takes comma-separated class ids, not {cfg.classes!r}") from None
    bad = [c for c in classes if not 0 <= c < gpt.config.num_classes]
    if bad:
        raise UsageError(f"classes {bad} outside [0, {gpt.config.num_classes})")
    labels = torch.tensor(classes).repeat_interleave(cfg.per_class)
    images = sample_images(cfg, gpt, tok, labels)
    labelled_grid(images, labels.tolist(), cfg.per_class).save(out)
    log.info("wrote %s", out)
    return out


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    try:
        run(cfg)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
        fail(e)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # defined in __main__ by value, with everything they reference, and some of that does not pickle.
    from jobs.sample import main as importable_main

    importable_main()
