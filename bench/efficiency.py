"""How much of the machine the tokenization job turns into tokens, measured side by side in one run.

Same photo-sized JPEGs for every figure:

(a) **parallel efficiency**: the job (``tiny`` config, centre crop, one single-threaded tokenizer
    per core) in images/s, over cores x a one-core loop that reads, decodes, crops and encodes
    the same images in batches of the job's size. 1.0 means the job adds nothing to the work.
(b) **feed efficiency**: the job's executor (:func:`pipelines.producer.ray_tokenize.run_items`,
    writing real shards) with a zero-cost tokenizer stand-in (it returns zeros without computing),
    centre + flip at 336 px, over cores x a bare loop of read + decode + source crop. This is the
    ceiling the CPU stage puts on a GPU stage: 1.0 means every core decodes all the time.

Targets: both >= 0.9. The job's figures are steady state, as in a run of millions of images: Ray's
worker processes are started and have imported their modules (a warm-up run on a few images does
that) and tokenizers are built before the clock starts; they include reading, decoding, cropping,
the object store, writing shards and commits.

Each figure is the median of ``--rounds`` interleaved measurements, after ``--warmup-rounds`` of
all four that are not counted. A warm-up round does what the first minutes of a long run do: Ray's
worker processes map the object store's pages as they first write them (a page fault each, which
later rounds barely pay), and caches fill.

For (b) it also prints where the cores went during the run (CPU seconds by kind of process, from
``/proc``, medians over rounds): the decode tasks against the bare loop's seconds for the same
images, the stand-ins, the committer, the driver, Ray's own processes, the rest of the machine, and
the cores' idle time. What is not decode work is the executor's cost on this machine.

Run: ``python -m bench.efficiency`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.local_s3 import cpu_seconds
from bench.pipeline import write_jpegs
from jobs.cli import parse_config, setup_logging
from pipelines.producer.images import DEFAULT_MAX_PIXELS, decode_image, expand_variants, make_variants, source_crops
from pipelines.producer.planning import plan
from pipelines.producer.ray_tokenize import run_items, start_committers
from pipelines.producer.tokenize import TokenizeOptions, TokenizerSpec, run_tokenize
from pipelines.ray_runtime import ray_session
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import to_tensor

log = logging.getLogger("bench.efficiency")


@dataclass
class BenchConfig:
    """Parallel and feed efficiency of the tokenization job on this machine."""

    images: int = field(default=0, metadata={"help": "JPEGs in the input folder (0: two work items per core)"})
    warmup_images: int = field(default=64, metadata={"help": "JPEGs of the warm-up run (starts Ray's workers)"})
    rows_per_shard: int = field(default=TokenizeOptions.rows_per_shard, metadata={"help": "images per work item (the job's default)"})
    batch_size: int = field(default=64, metadata={"help": "images per tokenizer forward (job and loop)"})
    rounds: int = field(default=3, metadata={"help": "measurements of each figure (the median is reported)"})
    warmup_rounds: int = field(default=1, metadata={"help": "rounds run first and not counted (see the module docstring)"})


class ZeroTokenizer:
    """Stands in for a tokenizer that costs nothing: the job's actor interface, zeros as codes."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def encode(self, sources: dict, variants: tuple[str, ...]) -> np.ndarray:
        n = len(next(iter(sources.values()))) if sources else 0
        return np.zeros((n, len(variants), self.tokens), np.uint16)


def one_core_encode_loop(paths: list[Path], batch_size: int) -> float:
    """Seconds for read + decode + centre crop + ``tiny`` encode of ``paths`` in one thread."""
    tok = VFMTokenizer.from_config("tiny", seed=0)
    size = tok.config.image_size
    start = time.perf_counter()
    for s in range(0, len(paths), batch_size):
        crops = [make_variants(decode_image(p.read_bytes()), size, ("center",)) for p in paths[s : s + batch_size]]
        tok.encode(to_tensor(np.concatenate(crops)))
    return time.perf_counter() - start


def bare_decode_loop(paths: list[Path], size: int, variants: tuple[str, ...]) -> float:
    """Seconds for read + decode + source crops of ``paths`` in one thread (no Ray, no writes)."""
    start = time.perf_counter()
    for p in paths:
        source_crops(decode_image(p.read_bytes()), size, variants)
    return time.perf_counter() - start


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds) of every process (Linux ``/proc``)."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[pid] = (cmd, cpu_seconds(pid))
        except OSError:  # gone meanwhile
            continue
    return out


def _group(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "driver"
    for name, group in (("ray::ZeroTokenizer", "stand_in_tokenizers"), ("ray::Committer", "committer"),
                        ("ray::DashboardAgent", "ray_processes"), ("ray::RuntimeEnvAgent", "ray_processes"),
                        ("ray::", "decode_tasks")):
        if cmd.startswith(name):
            return group
    return "ray_processes" if "/ray/" in cmd else "rest_of_machine"


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two :func:`_cpu_by_process` snapshots, by kind of process."""
    spent: dict[str, float] = {}
    for pid, (cmd, t) in after.items():
        group = _group(pid, cmd)
        spent[group] = spent.get(group, 0.0) + t - before.get(pid, (cmd, 0.0))[1]
    return spent


def run(cfg: BenchConfig) -> dict:
    times: dict[str, list[float]] = {"loop": [], "bare": [], "job": [], "feed": []}
    feed_cpu: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, ray_session() as ray:
        tmp = Path(tmp)
        cores = int(ray.cluster_resources()["CPU"])
        # By default whole work items, the same number for every core: the figures are the steady
        # state of a long run, not how a short one ends (4000 images made a last item of 928,
        # leaving a core idle for a tenth of an item at the end, which a run of millions never sees).
        n = cfg.images or 2 * cores * cfg.rows_per_shard
        paths = write_jpegs(tmp / "in", n)
        write_jpegs(tmp / "warmup", cfg.warmup_images, seed=1)
        torch.set_num_threads(1)
        variants = expand_variants(("center", "flip"))

        def job(name: str, out: str, rows_per_shard: int) -> dict:
            return run_tokenize(TokenizeOptions(
                input=str(tmp / name), output=str(tmp / out), spec=TokenizerSpec("tiny"),
                batch_size=cfg.batch_size, workers=cores, threads=1, rows_per_shard=rows_per_shard,
            ))

        job("warmup", "warmup-out", max(1, cfg.warmup_images // (4 * cores)))  # a few items on every core
        items = plan(str(tmp / "in"), "folder", cfg.rows_per_shard)

        def feed(r: int) -> float:
            # Stand-ins and committer are started (like the job's) before the clock starts and
            # stopped after, so that they idle through no other measurement.
            zero = ray.remote(ZeroTokenizer).options(num_cpus=0)
            actors = [zero.remote(256) for _ in range(cores)]
            committers = start_committers()
            ray.get([a.encode.remote({}, variants) for a in actors] + [c.requests.remote() for c in committers])
            try:
                before = _cpu_by_process()
                seconds = run_items(
                    items, actors=actors, committers=committers, image_size=336, output=str(tmp / f"feed-{r}"),
                    fmt="parquet", variants=variants, max_pixels=DEFAULT_MAX_PIXELS, storage_options=None,
                    max_decoding=2 * cores, max_bytes_in_flight=4 << 30, forward_images=cfg.batch_size // len(variants),
                ).seconds
                spent = cpu_by_group(before, _cpu_by_process())
                spent["idle"] = cores * seconds - sum(spent.values())
                if r >= cfg.warmup_rounds:
                    feed_cpu.append(spent)
                return seconds
            finally:
                for actor in [*actors, *committers]:
                    ray.kill(actor)

        # Rounds interleave the four measurements, so a drift in the machine's load hits all alike.
        for r in range(cfg.warmup_rounds + cfg.rounds):
            measured = {
                "loop": one_core_encode_loop(paths, cfg.batch_size),
                "bare": bare_decode_loop(paths, 336, variants),
                "job": job("in", f"job-{r}", cfg.rows_per_shard)["this_run"]["seconds"],
                "feed": feed(r),
            }
            if r >= cfg.warmup_rounds:
                for k, t in measured.items():
                    times[k].append(t)
    t_loop, t_bare, t_job, t_feed = (statistics.median(times[k]) for k in ("loop", "bare", "job", "feed"))
    out = {
        "cores": cores,
        "images": n,
        "rounds": cfg.rounds,
        "seconds_by_round": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "a_parallel": {
            "one_core_loop_images_per_s": round(n / t_loop, 1),
            "job_images_per_s": round(n / t_job, 1),
            "efficiency": round(t_loop / (cores * t_job), 3),
        },
        "b_feed": {
            "bare_decode_crop_images_per_s": round(n / t_bare, 1),
            "job_zero_cost_encoder_images_per_s": round(n / t_feed, 1),
            "efficiency": round(t_bare / (cores * t_feed), 3),
            "cpu_seconds": {"bare_loop_same_images": round(t_bare, 2), **{
                k: round(statistics.median(c.get(k, 0.0) for c in feed_cpu), 2)
                for k in ("decode_tasks", "stand_in_tokenizers", "committer", "driver", "ray_processes",
                          "rest_of_machine", "idle")}},
        },
    }
    log.info("(a) parallel efficiency %.3f: job %.1f img/s on %d cores vs one-core loop %.1f img/s (target >= 0.9)",
             out["a_parallel"]["efficiency"], n / t_job, cores, n / t_loop)
    log.info("(b) feed efficiency %.3f: zero-cost encoder job %.1f img/s vs %d x bare decode+crop %.1f img/s (target >= 0.9)",
             out["b_feed"]["efficiency"], n / t_feed, cores, n / t_bare)
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    setup_logging()
    run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
