"""The Ray tokenization pipeline: work items -> CPU decode/crop tasks -> tokenizer actors -> shard commits.

Each work item flows through three steps chained by object references:

    prepare (CPU task)  ->  encode (tokenizer actor, GPU or CPU)  ->  commit (CPU task)

The driver keeps a bounded window of items in flight (backpressure), so memory stays flat however
large the dataset. Exactly-once output follows from determinism plus the commit protocol: an item
always becomes the same shard bytes under the same name, and only a written commit record makes it
count. Actor deaths are retried by Ray (the actors restart and rerun the call). Storage faults are
retried request by request (:mod:`pipelines.contract.retry`); only when the store stays unavailable through
every attempt does Ray rerun the whole task (a few times), and if it still fails the item is reported
and the others go on. Any other exception raised in a task would repeat, so the first one stops the
job (:class:`JobStopped`), never retried; a rerun of the command finishes what is left.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from pipelines.producer.images import Rejected, cut_variants, decode_image, source_crops
from pipelines.contract.manifest import commit_shard
from pipelines.contract.retry import StorageUnavailable, counting, is_storage_fault
from pipelines.contract.shards import ShardRows
from pipelines.producer.sources import WorkItem, read_item, sha256
from pipelines.contract.storage import filesystem

log = logging.getLogger(__name__)


@dataclass
class TokenizerSpec:
    """How each actor builds its tokenizer (checkpoints or a seeded random config)."""

    config: str = "tiny"
    tokenizer: str | None = None
    dinov2: str | None = None
    seed: int = 0
    precision: str = "fp32"
    storage_options: dict = field(default_factory=dict)

    def build(self, device: str):
        from vfmtok_core import VFMTokenizer

        if self.tokenizer:
            return VFMTokenizer.from_pretrained(
                tokenizer=self.tokenizer, dinov2=self.dinov2, config=self.config, device=device,
                precision=self.precision, storage_options=self.storage_options,
            )
        return VFMTokenizer.from_config(self.config, seed=self.seed, device=device, precision=self.precision)


@dataclass
class Prepared:
    keys: list[str]
    labels: list[int | None]
    sources: list[str]
    digests: list[bytes]
    rejects: list[dict]
    io: Counter = field(default_factory=Counter)  # requests and retries made reading the item


def prepare(item: WorkItem, variants: tuple[str, ...], size: int, max_pixels: int, storage_options) -> tuple:
    """Read, decode and crop one work item -> (source crops {name: uint8 (N, H, W, 3)}, Prepared).

    Only the source crops travel to the tokenizer (one per image for centre and flip, the 1.1x crop
    for ten-crop): the variants are windows of them, cut on the tokenizer's device."""
    meta = Prepared([], [], [], [], [])
    crops: list[dict[str, np.ndarray]] = []
    with counting() as meta.io:
        for sample in read_item(item, storage_options):
            reason, error = sample.error or (None, None)
            if reason is None:
                try:
                    crops.append(source_crops(decode_image(sample.data, max_pixels), size, variants))
                except Rejected as e:
                    reason, error = e.reason, str(e)
            if reason is not None:
                meta.rejects.append({"key": sample.key, "source": sample.source, "reason": reason, "error": error})
                continue
            meta.keys.append(sample.key)
            meta.labels.append(sample.label)
            meta.sources.append(sample.source)
            meta.digests.append(sha256(sample.data))
    return {n: np.stack([c[n] for c in crops]) for n in (crops[0] if crops else ())}, meta


class TokenizerWorker:
    """Holds one tokenizer; turns source crops into tokens (N, V, T) uint16, cutting the variants
    and normalising on its device, a batch at a time."""

    def __init__(self, spec: TokenizerSpec, batch_size: int, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = spec.build(self.device)
        self.batch_size = batch_size

    def info(self) -> dict:
        cfg = self.tok.config
        return {
            "fingerprint": self.tok.fingerprint,
            "config": cfg.to_dict(),
            "image_size": cfg.image_size,
            "tokens_per_image": cfg.tokens_per_image,
            "codebook_size": cfg.quantizer.codebook_size,
            "device": self.device,
            "pid": os.getpid(),
        }

    def encode(self, sources: dict[str, np.ndarray], variants: tuple[str, ...]) -> np.ndarray:
        import torch

        from vfmtok_core.preprocess import normalize

        size, t = self.tok.config.image_size, self.tok.config.tokens_per_image
        n = len(next(iter(sources.values()))) if sources else 0
        out = np.empty((n, len(variants), t), np.uint16)
        step = max(1, self.batch_size // len(variants))  # images per forward: about batch_size crops
        for s in range(0, n, step):
            batch = {k: torch.from_numpy(v[s : s + step]).to(self.device) for k, v in sources.items()}
            crops = torch.stack(cut_variants(batch, size, variants, lambda x: x.flip(2)), dim=1)  # (b, V, S, S, 3)
            codes = self.tok.encode(normalize(crops.flatten(0, 1)))
            out[s : s + step] = codes.view(-1, len(variants), t).cpu().numpy()
        return out


def commit(item: WorkItem, meta: Prepared, tokens: np.ndarray, output: str, fmt: str, variants, storage_options) -> tuple:
    """Write the item's shard and rejects, then its commit record (see :func:`commit_shard`);
    returns (record, the requests and retries of reading and writing the item)."""
    with counting() as io:
        fs, root = filesystem(output, storage_options)
        rows = ShardRows(meta.keys, meta.labels, meta.sources, meta.digests, tokens) if meta.keys else None
        record = commit_shard(fs, root, item.shard, rows, fmt, variants, meta.rejects, item.unit)
    return record, io + meta.io


class JobStopped(RuntimeError):
    """A work item failed with an error that every retry, and every other item, would repeat (a
    corrupt input file, a bad setting): the job stops at once rather than fail item after item."""


def _repeats(error: Exception) -> bool:
    """True for an exception raised by our own code in a task (Ray wraps it in a RayTaskError that
    is also an instance of the original class), unless it is the store's weather. Lost workers and
    objects are Ray's to retry and are not deterministic."""
    import ray

    return isinstance(error, ray.exceptions.RayTaskError) and not is_storage_fault(error)


def _first_line(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


@dataclass
class RunStats:
    images: int = 0
    rejects: Counter = field(default_factory=Counter)
    bytes: int = 0
    shards: int = 0
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    records: dict = field(default_factory=dict)  # commit records written by this run, by shard
    io: Counter = field(default_factory=Counter)  # storage requests and retries


def start_workers(spec: TokenizerSpec, workers: int, gpus_per_worker: float, threads: int, batch_size: int) -> list:
    """Tokenizer actors that Ray restarts (and whose calls it retries) if their process dies."""
    import ray

    actor_cls = ray.remote(TokenizerWorker)
    # Actors hold no logical CPU: their count is explicit, and Ray's CPU slots are left to the
    # decode tasks that feed them (a CPU actor reserving a slot could starve its own input on a
    # small machine). CPU actors are spread over nodes; GPU actors are placed by their GPUs.
    # Named so that operators (and the fault tests) can find them: ``ray.get_actor("vfmtok-tokenizer-0")``.
    return [
        actor_cls.options(
            name=f"vfmtok-tokenizer-{i}",
            num_gpus=gpus_per_worker,
            num_cpus=0,
            scheduling_strategy="DEFAULT" if gpus_per_worker else "SPREAD",
            max_restarts=-1,
            max_task_retries=-1,
        ).remote(spec, batch_size, threads)
        for i in range(workers)
    ]


def run_items(
    items: list[WorkItem],
    *,
    actors: list,
    image_size: int,
    output: str,
    fmt: str,
    variants: tuple[str, ...],
    max_pixels: int,
    storage_options: Mapping | None,
    max_decoding: int,
    max_bytes_in_flight: int,
) -> RunStats:
    """Process ``items`` with ``actors``; returns counts (items failed by the store's weather are
    listed; an error that would repeat raises :class:`JobStopped`).

    Admission is by stage: an item enters while fewer than ``max_decoding`` items are being read,
    decoded and cropped (sized by the cluster's CPUs, so every CPU stays busy however many
    tokenizers there are) and the input bytes of all items in flight, decoded ones waiting for a
    tokenizer included, stay within ``max_bytes_in_flight`` (so the object store cannot fill up);
    one item is always admitted. Dispatch: each item goes to the tokenizer with the fewest items
    outstanding, so a slow or restarting actor does not hold a queue of work the others could do.
    """
    import ray
    from tqdm import tqdm

    so = dict(storage_options or {})
    # Only an outage that outlasted the per-request retries reruns a task; other errors repeat.
    retry = dict(max_retries=3, retry_exceptions=[StorageUnavailable])
    prepare_task = ray.remote(prepare).options(num_returns=2, num_cpus=1, **retry)
    commit_task = ray.remote(commit).options(num_cpus=0.25, **retry)

    stats = RunStats()
    queue = collections.deque(items)
    inflight: dict = {}  # commit ref -> (item, actor index)
    decoding: set = set()  # crop refs of items still being read and decoded
    outstanding = [0] * len(actors)
    bytes_in_flight = 0
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc="tokenize", unit="shard", dynamic_ncols=True)
    while queue or inflight:
        while queue and (not inflight or (
            len(decoding) < max_decoding and bytes_in_flight + queue[0].bytes <= max_bytes_in_flight
        )):
            item = queue.popleft()
            crops, meta = prepare_task.remote(item, variants, image_size, max_pixels, so)
            target = min(range(len(actors)), key=outstanding.__getitem__)
            tokens = actors[target].encode.remote(crops, variants)
            ref = commit_task.remote(item, meta, tokens, output, fmt, variants, so)
            inflight[ref] = (item, target)
            decoding.add(crops)
            outstanding[target] += 1
            bytes_in_flight += item.bytes
        done, _ = ray.wait([*decoding, *inflight], num_returns=1)
        if done[0] in decoding:  # decoded: its CPU is free for the next item
            decoding.discard(done[0])
            continue
        item, target = inflight.pop(done[0])
        outstanding[target] -= 1
        bytes_in_flight -= item.bytes
        try:
            record, io = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - sorted below: deterministic errors stop the job
            if _repeats(e):
                for ref in inflight:
                    ray.cancel(ref)
                bar.close()
                raise JobStopped(
                    f"work item {item.shard} ({item.unit}) failed with an error that would repeat: {_first_line(e)}. "
                    "Committed items are kept; fix the cause and rerun the same command."
                ) from None
            log.error("work item %s (%s) failed: %s", item.shard, item.unit, _first_line(e))
            stats.failed.append({"shard": item.shard, "unit": item.unit, "error": f"{type(e).__name__}: {e}"})
            bar.update(1)
            continue
        stats.records[record["shard"]] = record
        stats.io.update(io)
        stats.images += record["rows"]
        stats.rejects.update(record["rejects_by_reason"])
        stats.bytes += record["bytes"]
        stats.shards += bool(record["path"])
        elapsed = time.perf_counter() - start
        bar.set_postfix(images=stats.images, rejects=sum(stats.rejects.values()), img_s=f"{stats.images / elapsed:.1f}")
        bar.update(1)
    bar.close()
    stats.seconds = time.perf_counter() - start
    return stats

