"""Reconstruction metrics of a tokenizer on any image source: rFID, rIS, PSNR, SSIM, codebook use.

``python -m jobs.evaluate_tokenizer --data URL --tokenizer CKPT --dinov2 PTH --config NAME --inception FILE``

As upstream's ``vqgan_test.py``: each image is centre-cropped to the tokenizer's size (336) and
reconstructed (encode, decode); both are converted to uint8 as upstream does and PIL-resized
(bicubic) to ``--size`` (256). rFID compares the reconstructions' Inception statistics with the
ground truth's own (not ADM's reference batch), rIS is the reconstructions' Inception Score; PSNR on
[0, 1] images; SSIM standard (``data_range`` 1) and as upstream computes it (``data_range`` 2 on the
same [0, 1] images, which inflates it); codebook usage (distinct codes over the codebook size) and
perplexity. With ``--tokens URL`` the codes come from a token dataset made from the same input
(its ``center`` variant) instead of encoding: the images are needed only for the reference side.

Work is cut into chunks of ``--batch-size`` images, run here, on Ray actors (``--workers``) or on
``torchrun`` ranks. Writes ``report.json``, ``per_image.jsonl`` (key, PSNR, SSIM) and
``best_worst.png`` (the best and the worst reconstructions by PSNR, ground truth over
reconstruction) to ``--out``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from jobs.cli import UsageError, fail, parse_config, setup_logging, storage_options
from jobs.distributed import map_on_actors
from jobs.evaluate import load_inception
from pipelines.contract.inspect import load_tokens
from pipelines.contract.redact import redact_url
from pipelines.producer.images import Rejected, decode_image
from pipelines.producer.planning import plan
from pipelines.producer.sources import FORMATS, InputError, detect_format, read_item
from vfmtok_core import CONFIGS, VFMTokenizer
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.crop import center_crop
from vfmtok_core.metrics import FRECHET_METHODS, FeatureStats, codebook_perplexity, codebook_usage, frechet_distance, inception_score, psnr, ssim
from vfmtok_core.preprocess import to_tensor, to_uint8

log = logging.getLogger("jobs.evaluate_tokenizer")

SHOWN = 8  # best and worst reconstructions in the grid


@dataclass
class EvaluateTokenizerConfig:
    """Reconstruction metrics (rFID, rIS, PSNR, SSIM, codebook usage) of a tokenizer on an image source."""

    data: str = field(default="", metadata={"help": "images: folder, WebDataset, Parquet or LMDB (local or URL; required)"})
    inception: str = field(default="", metadata={"help": "Inception weights file for rFID/rIS (torch-fidelity's; required)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer checkpoint (default: seeded random weights)"})
    dinov2: str | None = field(default=None, metadata={"help": "DINOv2 .pth of the tokenizer"})
    config: str = field(default="tiny", metadata={"help": "tokenizer config", "choices": sorted(CONFIGS)})
    tokens: str | None = field(default=None, metadata={"help": "decode this token dataset's codes instead of encoding (made from --data)"})
    out: str = field(default="out/eval-tokenizer", metadata={"help": "folder for report.json, per_image.jsonl, best_worst.png"})
    num: int = field(default=0, metadata={"help": "evaluate the first N images of the input (0: all; upstream: the 50k of ImageNet val)"})
    size: int = field(default=256, metadata={"help": "resolution the metrics are computed at (upstream: 256)"})
    batch_size: int = field(default=32, metadata={"help": "images per chunk"})
    fid_method: str = field(default="eigh", metadata={"help": "the root's trace in rFID: eigh (same value, faster) or sqrtm (ADM's arithmetic)", "choices": list(FRECHET_METHODS)})
    workers: int = field(default=0, metadata={"help": "Ray actors (0: this process, or the torchrun ranks)"})
    input_format: str | None = field(default=None, metadata={"help": "input layout (default: detected)", "choices": list(FORMATS)})
    precision: str = field(default="fp32", metadata={"help": "tokenizer precision", "choices": ["fp32", "bf16"]})
    seed: int = field(default=0, metadata={"help": "random-weight seed when no --tokenizer is given"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options for URLs: JSON, or @FILE holding JSON"})


def _tokenizer(cfg: EvaluateTokenizerConfig) -> VFMTokenizer:
    so = storage_options(cfg.storage_options)
    if cfg.tokenizer:
        # Whole, even when only decoding a token dataset's codes: the fingerprint that must match the
        # dataset's covers the DINOv2 weights too (a decoder-only tokenizer's never matches).
        return VFMTokenizer.from_pretrained(cfg.tokenizer, dinov2=cfg.dinov2, config=cfg.config, device=cfg.device,
                                            precision=cfg.precision, storage_options=so)
    log.warning("no --tokenizer: random %r weights (seed %d)", cfg.config, cfg.seed)
    return VFMTokenizer.from_config(cfg.config, seed=cfg.seed, device=cfg.device, precision=cfg.precision)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, size, size, 3) with Pillow's bicubic, as upstream resizes both sides."""
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


class _Evaluator:
    """The tokenizer and the Inception network, built once; metrics of one chunk at a time."""

    def __init__(self, cfg: EvaluateTokenizerConfig):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            cfg.device = "cpu"
        self.cfg = cfg
        self.tok = _tokenizer(cfg)
        self.net = load_inception(cfg.inception, cfg.device, storage_options(cfg.storage_options))

    def chunk(self, samples: list[tuple[str, bytes | None, tuple | None]], codes: np.ndarray | None) -> dict:
        """Decode and crop the chunk's images (here, where the work is spread), reconstruct them
        (or decode the given codes) and measure; unusable images are reported, not fatal."""
        cfg = self.cfg
        keys, crops, kept, rejected = [], [], [], []
        for i, (key, data, error) in enumerate(samples):
            if error is not None:
                rejected.append((key, *error))
                continue
            try:
                crops.append(np.asarray(center_crop(decode_image(data), self.tok.config.image_size)))
            except Rejected as e:
                rejected.append((key, e.reason, str(e)))
                continue
            keys.append(key)
            kept.append(i)
        if not keys:
            return {"keys": [], "rejected": rejected}
        crops = np.stack(crops)
        codes = self.tok.encode(to_tensor(crops).to(cfg.device)).cpu().numpy() if codes is None else codes[kept]
        recon = to_uint8(self.tok.decode(torch.from_numpy(codes).long()))
        truth, recon = _resize(crops, cfg.size), _resize(recon, cfg.size)
        with torch.no_grad():
            acts = {name: self.net(torch.from_numpy(images).to(cfg.device).permute(0, 3, 1, 2).float())
                    for name, images in (("truth", truth), ("recon", recon))}
        t, r = truth.astype(np.float64) / 255, recon.astype(np.float64) / 255
        p = psnr(t, r, data_range=1.0)
        order = np.argsort(p)
        shown = sorted(set(order[:SHOWN].tolist()) | set(order[-SHOWN:].tolist()))
        return {
            "keys": keys, "rejected": rejected, "codes": codes, "psnr": p, "ssim": ssim(t, r, data_range=1.0),
            "ssim_upstream": ssim(t, r, data_range=2.0),
            "truth_pool": acts["truth"]["pool"].cpu().numpy(), "recon_pool": acts["recon"]["pool"].cpu().numpy(),
            "recon_logits": acts["recon"]["logits"].cpu().numpy(),
            "shown": [(float(p[i]), keys[i], truth[i], recon[i]) for i in shown],
        }


def _samples(cfg: EvaluateTokenizerConfig, so: Mapping | None) -> Iterator[tuple[str, bytes | None, tuple | None]]:
    """(key, encoded bytes, None) of the input's first ``--num`` samples in plan order, or
    (key, None, (reason, message)) for one the input checks refused."""
    fmt = cfg.input_format or detect_format(cfg.data, so)
    seen = 0
    for item in plan(cfg.data, fmt, 1024, so):
        for sample in read_item(item, so):
            if cfg.num and seen >= cfg.num:
                return
            seen += 1
            yield sample.key, sample.data, sample.error


def _token_lookup(cfg: EvaluateTokenizerConfig, tok: VFMTokenizer, so: Mapping | None) -> dict[str, np.ndarray]:
    """Key -> the ``center`` variant's codes of a token dataset made by this tokenizer."""
    manifest, rows, _ = load_tokens(cfg.tokens, so)
    if manifest["fingerprint"] != tok.fingerprint:
        raise UsageError(f"{cfg.tokens} was made by tokenizer {manifest['fingerprint']}, not {tok.fingerprint}: "
                         "its codes decode to something else with this one")
    if "center" not in manifest["variants"]:
        raise UsageError(f"{cfg.tokens} has no 'center' variant (it has {', '.join(manifest['variants'])})")
    n = tok.config.tokens_per_image
    v = manifest["variants"].index("center")
    return {k: np.asarray(t[v * n : (v + 1) * n], np.int64) for k, t in zip(rows["key"].to_list(), rows["tokens"].to_list())}


def _chunks(cfg: EvaluateTokenizerConfig, lookup: dict | None, so) -> Iterator[tuple[list, np.ndarray | None]]:
    """Chunks of ``--batch-size`` samples (with their codes from the token dataset, if one is
    given), still encoded: whoever evaluates a chunk decodes it."""
    batch, missing = [], 0

    def emit():
        return batch, np.stack([lookup[k] for k, _, _ in batch]) if lookup is not None else None

    for key, data, error in _samples(cfg, so):
        if lookup is not None and key not in lookup:
            missing += 1
            continue
        batch.append((key, data, error))
        if len(batch) == cfg.batch_size:
            yield emit()
            batch = []
    if batch:
        yield emit()
    if missing:
        log.warning("%d images have no codes in %s and were left out", missing, cfg.tokens)


def _run_chunks(cfg: EvaluateTokenizerConfig, chunks: Iterator, evaluator: _Evaluator | None) -> list[dict]:
    """Every chunk's results, in input order: here, on the torchrun ranks (rank r takes every W-th
    chunk; results gathered on every rank), or on Ray actors (two chunks in flight each)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    bar = tqdm(desc="evaluate", unit="chunk", disable=rank != 0)
    if not cfg.workers:
        mine = []
        for i, chunk in enumerate(chunks):
            if i % world == rank:
                mine.append((i, evaluator.chunk(*chunk)))
            bar.update(1)
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            mine = [r for part in gathered for r in part]
        return [r for _, r in sorted(mine, key=lambda x: x[0])]
    results: dict = {}

    def keep(i: int, result: dict) -> None:
        results[i] = result
        bar.update(1)

    map_on_actors(_Evaluator, (cfg,), cfg.workers, enumerate(chunks), keep)
    return [results[i] for i in sorted(results)]


def _grid(shown: list, size: int) -> Image.Image:
    """Best reconstructions (left half) and worst (right half) by PSNR: ground truth over reconstruction."""
    ranked = sorted(shown, key=lambda s: -s[0])
    picks = ranked[:SHOWN] + ranked[-SHOWN:] if len(ranked) > 2 * SHOWN else ranked
    grid = np.full((2 * size, len(picks) * size, 3), 255, np.uint8)
    for j, (_, _, truth, recon) in enumerate(picks):
        grid[:size, j * size : (j + 1) * size] = truth
        grid[size:, j * size : (j + 1) * size] = recon
    return Image.fromarray(grid)


def run(cfg: EvaluateTokenizerConfig) -> dict:
    if not cfg.data or not cfg.inception:
        raise UsageError("--data and --inception are required")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    so = storage_options(cfg.storage_options)
    evaluator = None if cfg.workers else _Evaluator(cfg)
    tok = evaluator.tok if evaluator else _tokenizer(cfg)
    lookup = _token_lookup(cfg, tok, so) if cfg.tokens else None
    results = _run_chunks(cfg, _chunks(cfg, lookup, so), evaluator)
    rejected = [r for res in results for r in res["rejected"]]
    for key, reason, message in rejected:
        log.warning("skipped %s (%s): %s", key, reason, message)
    results = [r for r in results if r["keys"]]
    if not results:
        raise UsageError(f"no readable images in {cfg.data}")
    cat = {k: np.concatenate([r[k] for r in results]) for k in ("codes", "psnr", "ssim", "ssim_upstream", "truth_pool",
                                                                  "recon_pool", "recon_logits")}
    keys = [k for r in results for k in r["keys"]]
    size = tok.config.quantizer.codebook_size
    report = {
        "images": len(keys), "rejected": len(rejected),
        "rfid": frechet_distance(FeatureStats.from_activations(cat["recon_pool"]), FeatureStats.from_activations(cat["truth_pool"]),
                                 method=cfg.fid_method),
        "ris": inception_score(cat["recon_logits"]),
        "psnr": float(cat["psnr"].mean()),
        "ssim": float(cat["ssim"].mean()),
        "ssim_upstream": float(cat["ssim_upstream"].mean()),
        "codebook_usage": codebook_usage(cat["codes"], size),
        "codebook_perplexity": codebook_perplexity(cat["codes"], size),
        "tokenizer": tok.fingerprint, "codes_from": cfg.tokens or "encoding", "size": cfg.size,
        "inception": redact_url(cfg.inception),
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        with open(out / "per_image.jsonl", "w") as f:
            for k, p, s in zip(keys, cat["psnr"], cat["ssim"]):
                f.write(json.dumps({"key": k, "psnr": float(p), "ssim": float(s)}) + "\n")
        _grid([s for r in results for s in r["shown"]], cfg.size).save(out / "best_worst.png")
    return report


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_config(EvaluateTokenizerConfig, argv, description=__doc__)
    try:
        report = run(cfg)
    except (UsageError, InputError, CheckpointError, FileNotFoundError) as e:
        fail(e)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(report, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # defined in __main__ by value, with everything they reference, and some of that does not pickle.
    from jobs.evaluate_tokenizer import main as importable_main

    importable_main()
