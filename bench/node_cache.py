"""The trainer's data path at cluster scale, measured on this machine: S3 bytes per epoch with the
node cache, and how well the epoch order mixes a class-sorted dataset.

(a) **Bytes fetched per epoch.** A token dataset on a local S3 server (moto, its own process),
    read through a proxy that counts the bytes it serves. 2 simulated nodes x 2 ranks x 2
    DataLoader workers (4 rank processes, ``VFMTOK_NODE`` naming their node) read one epoch each.
    Side by side: a cache per node (what runs) and a cache per rank (each rank told it is its own
    node: what a per-process cache costs at best; the design this replaced also gave each worker
    its own). Reported: bytes served over the dataset's shard bytes (target <= 2.1), each node's
    peak cache bytes against its budget, and what is left in the cache folder afterwards.
(b) **Shuffle quality.** For a class-sorted dataset (ImageNet-1k's layout: 1,000 classes of 1,281
    images, 1,024 per shard, so most shards hold one class; and ImageNet-21k's: 21,841 classes of
    ~640), the classes seen in the first 2% of an epoch: global order vs a full random permutation
    (target >= 0.95), and the window order this replaced (256 shards per window, its default for 1 MiB
    shards) for comparison, on a class-sorted plan (as plans were) and on the interleaved plan the
    job now makes of a folder. Computed from the orders themselves (no data is read).

Run: ``python -m bench.node_cache`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.local_s3 import moto_server
from jobs.cli import parse_config, setup_logging
from pipelines.contract.order import EpochOrder
from pipelines.producer.planning import interleaved_order

log = logging.getLogger("bench.node_cache")


@dataclass
class BenchConfig:
    """S3 bytes per epoch with a node cache, and shuffle quality on class-sorted data."""

    shards: int = field(default=96, metadata={"help": "token shards in the dataset"})
    rows: int = field(default=512, metadata={"help": "samples per shard"})
    variants: int = field(default=2, metadata={"help": "token variants per sample"})
    batch: int = field(default=32, metadata={"help": "per-rank batch size"})
    cache_bytes: int = field(default=256 << 20, metadata={"help": "each node's cache budget"})


RANK_SCRIPT = """
import json, os, sys
from pipelines.consumer.streaming import TokenDataset, TokenLoader
a = json.loads(sys.argv[1])
ds = TokenDataset(a["url"], storage_options=a["opts"], rank=a["rank"], world_size=a["world"], cache_dir=a["root"],
                  cache_bytes=a["budget"], node=a["node"])
n = sum(len(b["key"]) for b in TokenLoader(ds, batch_size=a["batch"], num_workers=2))
ds.close()
print(json.dumps({"samples": n}))
"""


def _dataset(root: Path, cfg: BenchConfig) -> int:
    """Random tokens (the worst case for Parquet's compression); returns the shards' bytes."""
    from pipelines.contract.manifest import write_dataset
    from pipelines.contract.shards import ShardRows

    rng = np.random.default_rng(0)
    parts = []
    for s in range(cfg.shards):
        keys = [f"n{s:05d}/img{i:05d}" for i in range(cfg.rows)]
        tokens = rng.integers(0, 16384, (cfg.rows, cfg.variants, 256), dtype=np.uint16)
        parts.append(ShardRows(keys, [s] * cfg.rows, ["src"] * cfg.rows, [bytes(32)] * cfg.rows, tokens))
    identity = {"fingerprint": "bench", "variants": [f"v{i}" for i in range(cfg.variants)], "format": "parquet",
                "tokens_per_image": 256}
    manifest = write_dataset(str(root), parts, identity, 16384)
    return sum(s["bytes"] for s in manifest["shards"])


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.npy") if f.is_file()) if path.exists() else 0


def epoch_bytes(cfg: BenchConfig, url: str, opts: dict, proxy, nodes: list[str], root: Path) -> dict:
    """One epoch read by 4 rank processes on ``nodes`` (one name per rank)."""
    proxy.reset_counts()
    peak: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:  # each node folder's bytes, sampled while the epoch runs
        while not done.is_set():
            for d in root.glob("vfmtok-*/node-*"):
                peak[d.name] = max(peak.get(d.name, 0), _folder_bytes(d))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    procs = []
    for rank, node in enumerate(nodes):
        args = {"url": url, "opts": opts, "rank": rank, "world": len(nodes), "root": str(root), "budget": cfg.cache_bytes,
                "node": node, "batch": cfg.batch}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(args)], stdout=subprocess.PIPE,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"}))
    samples = sum(json.loads(p.communicate()[0])["samples"] for p in procs)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return {"samples": samples, "bytes_served": proxy.counts["bytes_out"], "seconds": round(seconds, 1),
            "peak_cache_bytes_by_node": peak, "left_in_cache_root": left}


def classes_seen(rows_per_class: int, classes: int, per_shard: int, share: float, window_shards: int) -> dict:
    """Distinct classes in the first ``share`` of an epoch of a class-sorted set, by order."""
    n = rows_per_class * classes
    labels = np.arange(n) // rows_per_class  # class-sorted, as a folder of class folders is planned
    rows = np.full(-(-n // per_shard), per_shard)
    rows[-1] = n - per_shard * (len(rows) - 1)
    first = np.arange(int(n * share))
    planned = labels[interleaved_order(labels)]  # the same folder as the job now plans it
    window = EpochOrder(rows, 0, 0, "window", window_shards).at(first)
    seen = {
        "random_permutation": len(np.unique(labels[np.random.default_rng(0).permutation(n)[: len(first)]])),
        "global": len(np.unique(labels[EpochOrder(rows, 0, 0, "global", 1).at(first)])),
        "window": len(np.unique(labels[window])),
        "windowinterleaved_order_plan": len(np.unique(planned[window])),
    }
    return {**seen, **{f"{k}_vs_random": round(seen[k] / seen["random_permutation"], 3)
                       for k in ("global", "window", "windowinterleaved_order_plan")}}


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    import s3fs

    from infra.s3_fault_proxy import FaultProxy

    with moto_server() as (endpoint, _), tempfile.TemporaryDirectory() as tmp, FaultProxy(endpoint) as proxy:
        tmp = Path(tmp)
        direct = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        shard_bytes = _dataset(tmp / "ds", cfg)
        # Kept alive until the proxy stops: its finaliser, run by a collection in the proxy's
        # thread, would close it on the proxy's event loop and print a traceback.
        uploader = s3fs.S3FileSystem(skip_instance_cache=True, **direct)
        uploader.put(str(tmp / "ds"), "bench/tokens", recursive=True)
        opts = {**direct, "client_kwargs": {**direct["client_kwargs"], "endpoint_url": proxy.endpoint}}
        runs = {
            "cache_per_node": epoch_bytes(cfg, "s3://bench/tokens", opts, proxy, ["a", "a", "b", "b"], tmp / "c1"),
            "cache_per_rank": epoch_bytes(cfg, "s3://bench/tokens", opts, proxy, ["r0", "r1", "r2", "r3"], tmp / "c2"),
        }
    for r in runs.values():
        r["bytes_over_dataset"] = round(r["bytes_served"] / shard_bytes, 3)
    out = {
        "dataset": {"shards": cfg.shards, "samples": cfg.shards * cfg.rows, "shard_bytes": shard_bytes},
        "layout": "2 nodes x 2 ranks x 2 DataLoader workers",
        "cache_budget_bytes": cfg.cache_bytes,
        "runs": runs,
        "per_rank_over_per_node_bytes": round(runs["cache_per_rank"]["bytes_served"] / runs["cache_per_node"]["bytes_served"], 2),
        "shuffle_first_2pct": {
            "imagenet_1k": classes_seen(1281, 1000, 1024, 0.02, 256),
            "imagenet_21k": classes_seen(641, 21841, 1024, 0.02, 256),
        },
        # A share where a random permutation does not yet see every class: a finer test of the order.
        "shuffle_first_0.1pct_imagenet_1k": classes_seen(1281, 1000, 1024, 0.001, 256),
    }
    node = runs["cache_per_node"]
    log.info("(a) S3 bytes over dataset bytes, one epoch, 2 nodes x 2 ranks x 2 workers: %.3f with a cache per node "
             "(target <= 2.1) vs %.3f with a cache per rank; peak cache per node %s of a %d budget; left behind: %s",
             node["bytes_over_dataset"], runs["cache_per_rank"]["bytes_over_dataset"], node["peak_cache_bytes_by_node"],
             cfg.cache_bytes, node["left_in_cache_root"] or "nothing")
    for name, q in out["shuffle_first_2pct"].items():
        log.info("(b) %s, classes in the first 2%% of an epoch: global order %d, random permutation %d (ratio %.3f, "
                 "target >= 0.95); window order %d (ratio %.3f) on a class-sorted plan, %d (ratio %.3f) on the "
                 "interleaved plan", name, q["global"], q["random_permutation"], q["global_vs_random"], q["window"],
                 q["window_vs_random"], q["windowinterleaved_order_plan"], q["windowinterleaved_order_plan_vs_random"])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
