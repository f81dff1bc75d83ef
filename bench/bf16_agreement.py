"""How often bf16 autocast gives the same codes as fp32: the measurement behind ``--precision auto``
(bf16 on CUDA) being the tokenization job's default.

Two figures, each the share of codes equal between the two precisions on the same inputs:

(a) the official-size config ``vfmtok-l14-336`` loaded with the golden fixtures' deterministic
    weights (tests/golden.py), on the golden input images; the fp32 codes' agreement with the
    official code's expected codes is printed beside it, to show the fp32 side is the reference;
(b) the ``tiny`` config with seed-0 random weights on the bundled photos, centre and flip crops.

Runs on CUDA when present, else on the CPU with CPU bf16 autocast (the JSON names the device): the
CPU figure is an indication only, since CPU and CUDA bf16 kernels round differently. fp32 is IEEE
float32 on both sides (no TF32), as the job runs it.

Run: ``python -m bench.bf16_agreement`` (a few minutes on 2 cores; ``--no-official`` for (b) alone).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.cli import parse_config, setup_logging
from pipelines.producer.images import make_variants
from pipelines.producer.precision import fp32_math
from pipelines.producer.samples import bundled_photos
from vfmtok_core import VFMTokenizer
from vfmtok_core.checkpoint import load_strict
from vfmtok_core.preprocess import to_tensor

log = logging.getLogger("bench.bf16_agreement")


@dataclass
class BenchConfig:
    """Share of codes equal between bf16 autocast and fp32 encode."""

    device: str = field(default="auto", metadata={"help": "auto: cuda if present, else cpu", "choices": ["auto", "cuda", "cpu"]})
    official: bool = field(default=True, metadata={"help": "measure (a), the official-size config on the golden weights"})
    batch_size: int = field(default=16, metadata={"help": "images per forward"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})


def _encode(tok: VFMTokenizer, images: torch.Tensor, precision: str, batch_size: int) -> torch.Tensor:
    tok.precision = precision
    with fp32_math("fp32"):
        return torch.cat([tok.encode(images[s : s + batch_size]).cpu() for s in range(0, len(images), batch_size)])


def agreement(tok: VFMTokenizer, images: torch.Tensor, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Share of equal codes, overall and for the worst image; returns the fp32 codes too."""
    fp32 = _encode(tok, images, "fp32", batch_size)
    bf16 = _encode(tok, images, "bf16", batch_size)
    tok.precision = "fp32"
    equal = fp32 == bf16
    return {
        "images": len(images),
        "codes": equal.numel(),
        "equal_share": equal.float().mean().item(),
        "worst_image_share": equal.float().mean(1).min().item(),
    }, fp32


def golden_tokenizer(device: str) -> VFMTokenizer:
    """``vfmtok-l14-336`` with the golden recipe weights, every key checked as the loader checks it."""
    from tests.golden import recipe_state_dict

    tok = VFMTokenizer("vfmtok-l14-336")
    state = {f"dinov2.{k}": v for k, v in recipe_state_dict("dinov2").items()} | recipe_state_dict("tokenizer")
    load_strict(tok, state, "golden recipe weights")
    return tok.to(device)


def run(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "bf16": "CUDA bf16 autocast" if device == "cuda" else "CPU bf16 autocast (indicative only for CUDA)",
        "threads": torch.get_num_threads(),
    }
    if cfg.official:
        from tests.golden import load_npz

        tok = golden_tokenizer(device)
        images = to_tensor(load_npz("inputs")["images_uint8"]).to(device)
        entry, fp32 = agreement(tok, images, cfg.batch_size)
        expected = torch.from_numpy(load_npz("expected_tokenizer")["codes"])
        entry["fp32_equal_to_official_share"] = (fp32 == expected).float().mean().item()
        result["official_golden"] = entry
        log.info("(a) vfmtok-l14-336, golden weights and inputs: %s", entry)
        del tok
    tok = VFMTokenizer.from_config("tiny", seed=0, device=device)
    variants = ("center", "flip")
    crops = np.concatenate([make_variants(img, tok.config.image_size, variants) for _, img in bundled_photos()])
    entry, _ = agreement(tok, to_tensor(crops).to(device), cfg.batch_size)
    result["tiny_photos_center_flip"] = entry
    log.info("(b) tiny, seed 0, bundled photos, centre and flip: %s", entry)
    print(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
