"""Throughput of the Ray tokenization job against the baselines it replaces, measured in one run.

(a) ``tiny`` config, where per-image overheads dominate: this job versus a loop in the style of
    LlamaGen's code extraction (one image at a time, batch 1, one ``.npy`` file per image).
(b) official-size config (random weights): this job versus the bare ``VFMTokenizer.encode`` on
    tensors decoded beforehand, same threads.
(c) bytes per image of the Parquet shards (256 tokens, one variant).

The job's figures exclude starting Ray, its worker processes (a warm-up run on 64 images starts
them) and the tokenizers (all one-off), and include reading, decoding, cropping and writing.

Run: ``python -m bench.pipeline`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.cli import parse_config, setup_logging
from pipelines.producer.images import decode_image, make_variants
from pipelines.ray_runtime import ray_session
from pipelines.producer.tokenize import TokenizeOptions, TokenizerSpec, run_tokenize
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import to_tensor

log = logging.getLogger("bench.pipeline")


@dataclass
class BenchConfig:
    """Benchmark the tokenization job against a per-image loop and against bare encode."""

    tiny_images: int = field(default=3000, metadata={"help": "images for (a)"})
    official_images: int = field(default=12, metadata={"help": "images for (b)"})
    official: bool = field(default=True, metadata={"help": "run (b) with the official-size config"})


def write_jpegs(root: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-sized JPEGs made from the bundled photos (random crops and scales, so each differs)."""
    from pipelines.producer.samples import bundled_photos

    rng = np.random.default_rng(seed)
    photos = [np.asarray(img) for _, img in bundled_photos()]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(src[y : y + ch, x : x + cw]).resize((int(cw * 0.8), int(ch * 0.8)))
        path = root / f"img{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def naive_loop(tok: VFMTokenizer, paths: list[Path], out: Path) -> float:
    """LlamaGen-style extraction: one image per forward, one int64 .npy of codes per image."""
    out.mkdir(parents=True, exist_ok=True)
    size = tok.config.image_size
    start = time.perf_counter()
    for i, path in enumerate(paths):
        crops = make_variants(decode_image(path.read_bytes()), size, ("center",))
        codes = tok.encode(to_tensor(crops)).numpy()
        np.save(out / f"{i}.npy", codes[None])
    return time.perf_counter() - start


def job(inp: Path, out: Path, spec: TokenizerSpec, batch_size: int, workers: int, threads: int,
        rows_per_shard: int = 256) -> dict:
    opts = TokenizeOptions(
        input=str(inp), output=str(out), spec=spec, batch_size=batch_size, rows_per_shard=rows_per_shard,
        workers=workers, threads=threads,
    )
    return run_tokenize(opts)


def ray_cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def worst_case_bytes_per_image(rows: int = 1024) -> float:
    """Bytes per row of a full shard whose tokens are uniformly random over a 16384-entry codebook:
    the most any VFMTok-size tokenizer can need (real code distributions are skewed and compress more)."""
    from pipelines.contract.shards import ShardRows, parquet_bytes

    rng = np.random.default_rng(0)
    shard = ShardRows(
        keys=[f"train/n{rng.integers(1e8):08d}/{i:08d}" for i in range(rows)],
        labels=rng.integers(0, 1000, rows).tolist(),
        sources=["s3://bucket/train/part-000123.tar"] * rows,
        digests=[rng.bytes(32) for _ in range(rows)],
        tokens=rng.integers(0, 16384, (rows, 1, 256)).astype(np.uint16),
    )
    return len(parquet_bytes(shard)) / rows


def run(cfg: BenchConfig) -> dict:
    threads = torch.get_num_threads()
    results: dict = {"threads": threads}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        tmp = Path(tmp)
        paths = write_jpegs(tmp / "tiny_in", cfg.tiny_images)
        # Small model: one single-threaded actor per core beats one actor with intra-op threads.
        cores = int(ray_cluster_cpus())
        # A warm-up run on a few images starts Ray's worker processes and has them import their
        # modules, one-off costs that a run of millions of images does not notice. The loop runs
        # after it, so that neither side shares the cores with Ray's start.
        write_jpegs(tmp / "warmup", 64, seed=2)
        job(tmp / "warmup", tmp / "warmup_out", TokenizerSpec("tiny"), 64, workers=cores, threads=1, rows_per_shard=8)
        tok = VFMTokenizer.from_config("tiny", seed=0)
        t_naive = naive_loop(tok, paths, tmp / "naive_out")
        summary = job(tmp / "tiny_in", tmp / "tiny_out", TokenizerSpec("tiny"), 64, workers=cores, threads=1)
        t_job = summary["this_run"]["seconds"]
        results["a"] = {
            "images": cfg.tiny_images,
            "naive_images_per_s": cfg.tiny_images / t_naive,
            "job_images_per_s": cfg.tiny_images / t_job,
            "speedup": t_naive / t_job,
            "job_bytes_per_image": summary["bytes"] / summary["images"],
        }
        log.info("(a) tiny, %d images: naive loop %.1f img/s, job (%d actors x 1 thread) %.1f img/s -> %.2fx (target >= 2x)",
                 cfg.tiny_images, results["a"]["naive_images_per_s"], cores, results["a"]["job_images_per_s"], results["a"]["speedup"])
        if cfg.official:
            paths = write_jpegs(tmp / "big_in", cfg.official_images, seed=1)
            big = VFMTokenizer.from_config("vfmtok-l14-336", seed=0)
            x = torch.cat([to_tensor(make_variants(decode_image(p.read_bytes()), 336, ("center",))) for p in paths])
            bare = []
            for s in range(0, len(x), 4):
                t = time.perf_counter()
                big.encode(x[s : s + 4])
                bare.append(time.perf_counter() - t)
            del big
            t_bare = sum(bare)
            summary = job(tmp / "big_in", tmp / "big_out", TokenizerSpec("vfmtok-l14-336"), 4, workers=1, threads=threads)
            t_job = summary["this_run"]["seconds"]
            results["b"] = {
                "images": cfg.official_images,
                "bare_encode_images_per_s": cfg.official_images / t_bare,
                "job_images_per_s": cfg.official_images / t_job,
                "ratio": t_bare / t_job,
                "job_bytes_per_image": summary["bytes"] / summary["images"],
            }
            log.info("(b) vfmtok-l14-336, %d images: bare encode %.3f img/s, job %.3f img/s -> %.2f (target >= 0.85)",
                     cfg.official_images, results["b"]["bare_encode_images_per_s"], results["b"]["job_images_per_s"], results["b"]["ratio"])
    results["c"] = {f"job_{k}": results[k]["job_bytes_per_image"] for k in ("a", "b") if k in results}
    results["c"]["uniform_16384_codes_1024_rows"] = worst_case_bytes_per_image()
    log.info("(c) Parquet bytes per image (256 tokens, 1 variant, with key/label/source/sha256): %s (target <= 560; "
             "the job figures include each file's footer, which small test shards do not amortise)",
             {k: round(v, 1) for k, v in results["c"].items()})
    print(json.dumps(results, indent=1))
    return results


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
