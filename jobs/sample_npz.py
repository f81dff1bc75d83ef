"""``jobs.sample --num N``: N samples for the ADM evaluator, sampled in seeded chunks by Ray actors,
torchrun ranks or this process, and streamed into one ``.npz``.

Chunk ``c`` holds samples ``c*B .. (c+1)*B - 1`` (B = ``--batch-size``), generated in one batch
with a generator seeded by (seed, c), so its bytes do not depend on which worker made it or how
many there were. Labels are fixed up front by the seed. Finished chunks are written atomically to
``<out>.parts/``; a rerun computes only the missing ones, then the parts are assembled and removed.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs.distributed import map_on_actors
from pipelines.contract.sample_batch import finished_chunks, parts_url, read_chunk, write_chunk, write_sample_batch
from pipelines.contract.storage import filesystem
from vfmtok_core.generate import compiled_decode, generate
from vfmtok_core.preprocess import to_uint8

log = logging.getLogger("jobs.sample")


def sample_labels(num: int, classes: int, mode: str, seed: int) -> np.ndarray:
    """``balanced``: every class ``num // classes`` times (the first ``num % classes`` classes once
    more), in a seeded random order; ``random``: uniform draws, as upstream's sampler makes them."""
    rng = np.random.default_rng([seed, 0x1AB])
    if mode == "random":
        return rng.integers(0, classes, num).astype(np.int64)
    return rng.permutation(np.arange(num, dtype=np.int64) % classes)


def sample_chunk(cfg, gpt, tok, labels: np.ndarray, index: int, decode_fn=None) -> np.ndarray:
    """uint8 (n, S, S, 3) images of chunk ``index`` (its labels given), from its own seeded generator;
    ``decode_fn``: the GPT's decode step compiled once per process (``--compile``)."""
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed * 1_000_003 + index)
    codes = generate(gpt, torch.from_numpy(labels), cfg.cfg_scale, cfg.temperature, cfg.top_k, cfg.top_p, cfg.greedy,
                     gen, decode_fn=decode_fn)
    return to_uint8(tok.decode(codes, size=cfg.image_size))


def _chunks(num: int, size: int) -> list[tuple[int, int, int]]:
    return [(c, start, min(num, start + size)) for c, start in enumerate(range(0, num, size))]


class _Sampler:
    """A Ray actor holding the models (built once) and sampling the chunks it is sent."""

    def __init__(self, cfg):
        from jobs.sample import build_models

        if cfg.device == "cuda" and not torch.cuda.is_available():
            cfg.device = "cpu"
        self.cfg = cfg
        self.gpt, self.tok = build_models(cfg)
        self.decode_fn = compiled_decode(self.gpt) if cfg.compile else None

    def chunk(self, labels: np.ndarray, index: int) -> np.ndarray:
        return sample_chunk(self.cfg, self.gpt, self.tok, labels, index, self.decode_fn)


def sample_npz(cfg, build_models, num_classes: int) -> str:
    """Sample ``cfg.num`` images into the ``.npz`` at ``cfg.out``; returns its path (every rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    labels = sample_labels(cfg.num, num_classes, cfg.labels, cfg.seed)
    parts = parts_url(cfg.out)
    chunks = _chunks(cfg.num, cfg.batch_size)
    done = finished_chunks(parts)
    todo = [c for c in chunks if c[0] not in done]
    if rank == 0 and done:
        log.info("resuming: %d of %d chunks already sampled", len(chunks) - len(todo), len(chunks))
    start = time.perf_counter()
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="sampling", unit="chunk", disable=rank != 0)
    if cfg.workers and todo:
        # The driver writes each chunk as it arrives, so a crash loses only the chunks in flight.
        def keep(c: int, images: np.ndarray) -> None:
            write_chunk(parts, c, images)
            bar.update(1)

        map_on_actors(_Sampler, (cfg,), cfg.workers, ((c, (labels[lo:hi], c)) for c, lo, hi in todo), keep)
    elif todo:
        gpt, tok = build_models(cfg)
        decode_fn = compiled_decode(gpt) if cfg.compile else None
        for c, lo, hi in todo[rank::world]:  # torchrun ranks take turns; one process takes all
            write_chunk(parts, c, sample_chunk(cfg, gpt, tok, labels[lo:hi], c, decode_fn))
            bar.update(world)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        made = sum(hi - lo for c, lo, hi in todo)
        log.info("%d images sampled in %.1fs (%.2f images/s)", made, time.perf_counter() - start,
                 made / max(1e-9, time.perf_counter() - start))
        write_sample_batch(cfg.out, (cfg.image_size, cfg.image_size, 3), (read_chunk(parts, c) for c, _, _ in chunks), labels)
        fs, root = filesystem(parts)
        fs.rm(root, recursive=True)
    if world > 1:
        dist.barrier()
    return cfg.out
