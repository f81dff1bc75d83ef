"""Overfit the ``tiny`` tokenizer on 8 bundled photos with the full objective, on this CPU.

Shows that the trainer learns: the reconstruction loss of the training batches falls by the
printed factor (target >= 5x) and PSNR rises by the printed dB (target >= 6 dB), measured on the
training batches (random crops) and, independently, on the photos' centre crops reconstructed with
the trained weights against the untrained ones. Run: ``python -m bench.train_tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from jobs.train_tokenizer import TrainTokenizerConfig, train
from pipelines.producer.samples import BUNDLED_PHOTOS, bundled_photos
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import center_crop, to_tensor

PHOTOS = BUNDLED_PHOTOS + ("retina", "camera")


def _psnr(model: VFMTokenizer, x: torch.Tensor) -> float:
    with torch.no_grad():
        mse = float(((model.decode(model.encode(x)).clamp(-1, 1) - x) ** 2).mean())
    return 10 * math.log10(4.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.0, help="decoder attention dropout (off: the point is to memorise)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for name, img in bundled_photos(PHOTOS):
            img.save(photos / f"{name}.png")
        out = Path(tmp) / "run"
        start = time.perf_counter()
        train(TrainTokenizerConfig(
            data=str(photos), out=str(out), config="tiny", global_batch=8, epochs=10**6, max_steps=args.steps,
            lr=args.lr, dropout=args.dropout, warmup_epochs=0, precision="fp32", log_every=1, image_every=0, ckpt_every=args.steps,
        ))
        elapsed = time.perf_counter() - start
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = torch.load(out / f"step-{args.steps:08d}.pt", map_location="cpu", weights_only=True)
        x = torch.cat([to_tensor(center_crop(Image.open(p).convert("RGB"), 112)) for p in sorted(photos.iterdir())])

    first, tail = metrics[0], metrics[-10:]
    rec_last = sum(m["reconstruction"] for m in tail) / len(tail)
    psnr_last = sum(m["psnr"] for m in tail) / len(tail)
    untrained = VFMTokenizer.from_config("tiny", seed=0)
    trained = VFMTokenizer.from_config("tiny", seed=0)
    trained.load_state_dict(state["model"], strict=False)
    before, after = _psnr(untrained, x), _psnr(trained, x)
    print(f"tiny tokenizer, 8 photos, global batch 8, {args.steps} steps in {elapsed:.0f} s ({args.steps / elapsed:.2f} steps/s)")
    print(f"training batches: reconstruction loss {first['reconstruction']:.4f} -> {rec_last:.4f} "
          f"(fell {first['reconstruction'] / rec_last:.1f}x, target >= 5x); "
          f"PSNR {first['psnr']:.2f} -> {psnr_last:.2f} dB ({psnr_last - first['psnr']:+.2f} dB, target >= +6)")
    print(f"centre crops, untrained vs trained weights: PSNR {before:.2f} -> {after:.2f} dB ({after - before:+.2f} dB)")


if __name__ == "__main__":
    main()
