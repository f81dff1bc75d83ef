"""The GPT trainer's speed, measured through ``jobs.train_gpt`` itself, side by side in one run.

For each size: the trainer with and without ``--compile`` (per-block ``torch.compile``) on the same
synthetic token set, batch and steps. Step time is the median of the steps after the first few
(which include compilation), from the trainer's own ``metrics.jsonl``; printed with tokens/s,
model TFLOP/s and the compiled/eager ratio. Then, for the largest size, the same FSDP run on 2 ranks (``torchrun``) with full vs sharded
checkpoints: the seconds a save holds training up and the bytes each rank writes, as ratios.

Precision follows the device: bf16 autocast on a GPU, fp32 on a CPU (CPU bf16 autocast is not how
anyone trains, and it compiles poorly). MFU is printed where the device's peak is known
(``--peak-tflops`` sets it).

Run: ``python -m bench.train`` (a few minutes on 2 cores: GPT-B steps take seconds there).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.loader import synthetic_dataset
from jobs.cli import parse_config, setup_logging
from jobs.train_gpt import TrainConfig, train

log = logging.getLogger("bench.train")


@dataclass
class BenchConfig:
    """Step time and tokens/s of the GPT trainer with and without torch.compile."""

    sizes: tuple[str, ...] = field(default=("GPT-tiny", "GPT-B"), metadata={"help": "GPT sizes to measure"})
    batch: int = field(default=0, metadata={"help": "global batch (0: 16 for GPT-tiny, 2 for larger sizes on a CPU, 32 on a GPU)"})
    steps: int = field(default=8, metadata={"help": "steps per side"})
    warmup: int = field(default=3, metadata={"help": "first steps left out of the timing (compilation)"})
    peak_tflops: float = field(default=0.0, metadata={"help": "device peak for MFU (0: known GPUs)"})
    checkpoints: bool = field(default=True, metadata={"help": "also compare full and sharded checkpoints on 2 ranks (torchrun; needs 2 GPUs on a GPU machine)"})


def _batch(size: str, cfg: BenchConfig) -> int:
    if cfg.batch:
        return cfg.batch
    if torch.cuda.is_available():
        return 32
    return 16 if size == "GPT-tiny" else 2


def measure(data: Path, out: Path, size: str, compiled: bool, cfg: BenchConfig) -> dict:
    batch = _batch(size, cfg)
    train(TrainConfig(
        data=str(data), out=str(out), size=size, global_batch=batch, max_steps=cfg.warmup + cfg.steps,
        log_every=1, compile=compiled, peak_tflops=cfg.peak_tflops,
        precision="bf16" if torch.cuda.is_available() else "fp32",
    ))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[cfg.warmup :]
    step_s = statistics.median(batch / m["samples_per_s"] for m in steady)
    return {
        "batch": batch,
        "step_seconds": round(step_s, 4),
        "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in steady), 1),
        "model_tflops_per_s": round(statistics.median(m["model_tflops_per_s"] for m in steady), 4),
        "mfu": metrics[-1]["mfu"],
        "peak_memory_gb": round(metrics[-1]["peak_memory_gb"], 2),
    }


def checkpoint_layouts(data: Path, tmp: Path, size: str, ranks: int) -> dict:
    """The same FSDP run on ``ranks`` processes saving full vs sharded checkpoints: the seconds
    training is held up by a save (rank 0's), and the bytes each rank writes."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = {}
    for layout in ("full", "sharded"):
        run = tmp / f"ckpt-{layout}"
        subprocess.run([torchrun, f"--nproc_per_node={ranks}", "-m", "jobs.train_gpt", "--data", str(data), "--out",
                        str(run), "--size", size, "--global-batch", str(2 * ranks), "--max-steps", "3", "--ckpt-every", "2",
                        "--log-every", "1", "--precision", "fp32", "--fsdp", "--checkpoint-format", layout],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if layout == "full":
            per_rank = [(run / "step-00000002.pt").stat().st_size] + [0] * (ranks - 1)
        else:
            files = sorted((run / "step-00000002").glob("*.distcp"))
            per_rank = [f.stat().st_size for f in files]
        out[layout] = {"held_up_seconds": round(metrics[2]["checkpoint_seconds"], 3), "bytes_per_rank": per_rank}
    out["held_up_full_over_sharded"] = round(out["full"]["held_up_seconds"] / out["sharded"]["held_up_seconds"], 2)
    out["largest_rank_bytes_full_over_sharded"] = round(max(out["full"]["bytes_per_rank"]) / max(out["sharded"]["bytes_per_rank"]), 2)
    return out


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_dataset(tmp / "ds", shards=8, rows=64, vocab=16384)
        for size in cfg.sizes:
            sides = {name: measure(tmp / "ds", tmp / f"{size}-{name}", size, name == "compiled", cfg)
                     for name in ("eager", "compiled")}
            ratio = sides["eager"]["step_seconds"] / sides["compiled"]["step_seconds"]
            results[size] = {**sides, "compiled_speedup": round(ratio, 3)}
            log.info("%s, batch %d: eager %.3f s/step (%.0f tokens/s), compiled %.3f s/step (%.0f tokens/s): "
                     "speed-up %.2fx", size, sides["eager"]["batch"], sides["eager"]["step_seconds"],
                     sides["eager"]["tokens_per_s"], sides["compiled"]["step_seconds"], sides["compiled"]["tokens_per_s"],
                     ratio)
        size = cfg.sizes[-1]
        if not cfg.checkpoints:
            print(json.dumps(results, indent=1))
            return results
        results["checkpoints"] = layouts = checkpoint_layouts(tmp / "ds", tmp, size, 2)
        log.info("%s checkpoints, FSDP on 2 ranks: training held up %.2f s by a full save vs %.2f s by a sharded "
                 "(async) one (%.1fx); largest bytes written by one rank %.1f MB vs %.1f MB (%.1fx)", size,
                 layouts["full"]["held_up_seconds"], layouts["sharded"]["held_up_seconds"],
                 layouts["held_up_full_over_sharded"], max(layouts["full"]["bytes_per_rank"]) / 1e6,
                 max(layouts["sharded"]["bytes_per_rank"]) / 1e6, layouts["largest_rank_bytes_full_over_sharded"])
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
