"""The Ray tokenization pipeline: work items -> CPU decode/crop tasks -> tokenizer actors -> shard commits.

Each work item flows through three steps chained by object references:

    prepare (CPU task, streams chunks)  ->  encode per chunk (tokenizer actor, GPU or CPU)  ->  commit (Committer actor)

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

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.producer.images import Rejected, decode_image, source_crops
from pipelines.contract.manifest import commit_shard
from pipelines.contract.retry import STATS, StorageUnavailable, counting, is_storage_fault
from pipelines.contract.shards import ShardRows, parquet_bytes
from pipelines.producer.sources import WorkItem, read_item, sha256
from pipelines.producer.worker import TokenizerSpec, TokenizerWorker
from pipelines.contract.storage import filesystem

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    keys: list[str]
    labels: list[int | None]
    sources: list[str]
    digests: list[bytes]
    rejects: list[dict]
    io: Counter = field(default_factory=Counter)  # requests and retries made reading the item


CHUNK_BYTES = 64 << 20  # source-crop bytes per encode call: ~190 images at 336 px, a fraction of a second of GPU
CHUNKS_AHEAD = 2  # chunks a decode task may have ready that the driver has not taken (then it pauses)


def prepare(item: WorkItem, variants: tuple[str, ...], size: int, max_pixels: int, storage_options,
            chunk_bytes: int = CHUNK_BYTES, forward_images: int = 1) -> Iterator:
    """Read, decode and crop one work item, yielding it in chunks: for each chunk its source crops
    ``{name: uint8 (N, H, W, 3)}`` then its :class:`Prepared` metadata (two objects, so the crops
    can go to a tokenizer while the metadata waits for the commit). At least one pair is yielded.

    Only the source crops travel to the tokenizer (one per image for centre and flip, the 1.1x crop
    for ten-crop): the variants are windows of them, cut on the tokenizer's device. A chunk holds at
    most ``chunk_bytes`` of crops, in whole forwards of ``forward_images`` (at least one forward),
    so a 10,000-image tar becomes many bounded objects that the tokenizer starts on while the rest
    is still being decoded, never one object of gigabytes. Run as a Ray streaming generator: the driver sees each chunk as it lands.
    The last chunk may be empty (it carries the item's remaining rejects and its request counts).
    A yielded crops dict is valid until the generator resumes (its arrays are reused, see
    :class:`_ChunkBuffer`): Ray copies it into the object store at once; a local caller must copy."""
    meta = Prepared([], [], [], [], [])
    chunk = _ChunkBuffer(chunk_bytes, forward_images)
    with counting() as io:
        for sample in read_item(item, storage_options):
            reason, error = sample.error or (None, None)
            if reason is None:
                try:
                    chunk.add(source_crops(decode_image(sample.data, max_pixels), size, variants))
                except Rejected as e:
                    reason, error = e.reason, str(e)
            if reason is not None:
                meta.rejects.append({"key": sample.key, "source": sample.source, "reason": reason, "error": error})
                continue
            meta.keys.append(sample.key)
            meta.labels.append(sample.label)
            meta.sources.append(sample.source)
            meta.digests.append(sha256(sample.data))
            if chunk.full:
                yield chunk.take()
                yield meta
                meta = Prepared([], [], [], [], [])
    meta.io = io  # the whole item's requests, reported once with its last chunk
    yield chunk.take()
    yield meta


class _ChunkBuffer:
    """Source crops of one chunk, written straight into arrays this process reuses chunk after chunk.

    Stacking a chunk's crops into a fresh array costs a copy into pages the kernel must first map,
    on every chunk; Ray copies the yielded chunk into its object store before the generator
    resumes, so the same, already-mapped arrays serve every chunk."""

    _arrays: dict = {}  # (source name, crop shape, capacity) -> reused array, per process

    def __init__(self, chunk_bytes: int, forward_images: int):
        self.chunk_bytes, self.forward, self.n, self.capacity, self.views = chunk_bytes, max(1, forward_images), 0, 0, {}

    def add(self, crops: dict[str, np.ndarray]) -> None:
        if not self.views:
            per_image = sum(c.nbytes for c in crops.values())
            self.capacity = max(1, self.chunk_bytes // per_image) // self.forward * self.forward or self.forward
            self.views = {name: self._arrays.setdefault((name, c.shape, self.capacity),
                                                        np.empty((self.capacity, *c.shape), c.dtype))
                          for name, c in crops.items()}
        for name, c in crops.items():
            self.views[name][self.n] = c
        self.n += 1

    @property
    def full(self) -> bool:
        return self.n == self.capacity > 0

    def take(self) -> dict[str, np.ndarray]:
        out = {name: v[: self.n] for name, v in self.views.items()}
        self.n = 0
        return out


def commit(item: WorkItem, output: str, fmt: str, variants, storage_options, chunks: int, *parts) -> tuple:
    """Write the item's shard and rejects, then its commit record (see :func:`commit_shard`);
    ``parts`` are the chunks' :class:`Prepared` then their tokens, in order. Returns (record, the
    requests and retries of reading the item; the writes are counted by :class:`Committer`)."""
    metas, tokens = parts[:chunks], parts[chunks:]
    keys = [k for m in metas for k in m.keys]
    fs, root = filesystem(output, storage_options)
    rows = None
    if keys:
        rows = ShardRows(keys, [x for m in metas for x in m.labels], [x for m in metas for x in m.sources],
                         [x for m in metas for x in m.digests], np.concatenate([t for t in tokens if len(t)]))
    rejects = [r for m in metas for r in m.rejects]
    record = commit_shard(fs, root, item.shard, rows, fmt, variants, rejects, item.unit)
    io = Counter()
    for m in metas:
        io.update(m.io)
    return record, io


class Committer:
    """Commits work items for the driver, many at once on threads.

    An actor rather than a task per item: a commit waits on storage (fsync, PUT), not on a CPU. As
    a task it would hold a share of a CPU slot that a decode task then cannot start in (on a 2-core
    node that left a core idle for each commit's fsync), and as a zero-CPU task it measured slower
    still in ``bench.efficiency`` (Ray runs such tasks in extra worker processes beside the decode
    tasks). The process's request counters are shared
    by its threads, so its writes are reported once for the run (:meth:`requests`)."""

    def __init__(self):
        # The first Parquet write loads the writer and its codec (a fifth of a second of CPU).
        # Done here, it overlaps the job's planning instead of delaying the first commit.
        parquet_bytes(ShardRows(["warm-up"], [0], ["warm-up"], [bytes(32)], np.zeros((1, 1, 1), np.uint16)))

    def commit(self, *args) -> tuple:
        return commit(*args)

    def requests(self) -> Counter:
        return STATS.snapshot()


COMMITS_IN_FLIGHT = 16  # per committer (one per node)


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
class _Flight:
    """An item in flight: the refs of its chunks' metadata and tokens so far, and the tokenizer
    each chunk went to."""

    item: WorkItem
    targets: list = field(default_factory=list)
    metas: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


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
    peak_store_bytes: int = 0  # most crop bytes sent to tokenizers and not seen encoded (each chunk at its bound)


def chunk_bound(image_size: int, variants: tuple[str, ...], chunk_bytes: int, forward_images: int) -> int:
    """The most crop bytes one chunk of :func:`prepare` can hold."""
    from PIL import Image

    probe = source_crops(Image.new("RGB", (2 * image_size, 2 * image_size)), image_size, variants)
    return max(chunk_bytes, max(1, forward_images) * sum(c.nbytes for c in probe.values()))


def start_workers(spec: TokenizerSpec, workers: int, gpus_per_worker: float, threads: int, batch_size: int) -> list:
    """Tokenizer actors that Ray restarts (and whose calls it retries) if their process dies."""
    import ray

    actor_cls = ray.remote(TokenizerWorker)
    # Actors hold no logical CPU: their count is explicit, and Ray's CPU slots are left to the
    # decode tasks that feed them (a CPU actor reserving a slot could starve its own input on a
    # small machine). CPU actors are spread over nodes; GPU actors are placed by their GPUs.
    # So a CPU actor's torch threads share their cores with the decode tasks: OpenMP threads that
    # spin while they wait (its default) take CPU from them; a passive wait gives more images/s on
    # these oversubscribed cores (``python -m bench.cpu_actors`` measures both side by side). It
    # must be in the environment before torch loads, hence the actor's runtime environment; a value
    # the driver's environment sets is passed on instead.
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # Named so that operators (and the fault tests) can find them: ``ray.get_actor("vfmtok-tokenizer-0")``.
    return [
        actor_cls.options(
            name=f"vfmtok-tokenizer-{i}",
            num_gpus=gpus_per_worker,
            num_cpus=0,
            scheduling_strategy="DEFAULT" if gpus_per_worker else "SPREAD",
            max_restarts=-1,
            max_task_retries=-1,
            runtime_env={"env_vars": env},
        ).remote(spec, batch_size, threads)
        for i in range(workers)
    ]


def tokenizer_info(actor) -> dict:
    """An actor's tokenizer facts (fingerprint, config, sizes). An actor that could not build its
    tokenizer (a missing or unreadable checkpoint, one that does not fit ``--config``) would fail
    the same way on every restart: the job stops at once with the reason, not Ray's traceback."""
    import ray

    try:
        return ray.get(actor.info.remote())
    except ray.exceptions.RayActorError as e:
        if not e.actor_init_failed:
            raise
        reason = next((line.strip() for line in reversed(e.error_msg.splitlines()) if line.strip()), "unknown")
        raise JobStopped(f"the tokenizer could not be built: {reason}") from None


def start_committers() -> list:
    """One :class:`Committer` per node (restarted by Ray if its process dies; a call it was running
    is retried, and a commit is idempotent)."""
    import ray

    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"]))
    committer = ray.remote(Committer).options(
        num_cpus=0, max_concurrency=COMMITS_IN_FLIGHT, scheduling_strategy="SPREAD", max_restarts=-1, max_task_retries=3,
    )
    return [committer.remote() for _ in range(nodes)]


def run_items(
    items: Sequence[WorkItem],
    *,
    actors: list,
    committers: list,
    image_size: int,
    output: str,
    fmt: str,
    variants: tuple[str, ...],
    max_pixels: int,
    storage_options: Mapping | None,
    max_decoding: int,
    max_bytes_in_flight: int,
    max_store_bytes: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    forward_images: int = 1,
) -> RunStats:
    """Process ``items`` with ``actors``; returns counts (items failed by the store's weather are
    listed; an error that would repeat raises :class:`JobStopped`).

    Admission is by stage: an item enters while fewer than ``max_decoding`` items are being read,
    decoded and cropped (sized by the cluster's CPUs, so every CPU stays busy however many
    tokenizers there are) and the input bytes of all items in flight, decoded ones waiting for a
    tokenizer included, stay within ``max_bytes_in_flight``; one item is always admitted. Dispatch:
    each chunk (``chunk_bytes`` of crops in whole forwards of ``forward_images``, see
    :func:`prepare`) goes, as soon as it is decoded, to the tokenizer with the fewest chunks
    outstanding (counted until their item commits: the driver wakes per chunk decoded and per item
    committed, not per chunk encoded), so a slow or restarting actor does not hold a queue of work
    the others could do, and the tokenizers finish together. The driver waits on references without
    fetching them (a chunk never travels to the driver's node).

    The object store is bounded by bytes, not items: the crops sent to tokenizers and not yet
    encoded stay within ``max_store_bytes`` (default: half the cluster's object store), each chunk
    counted at its largest possible size. When the tokenizers fall that far behind (small images
    make many crop bytes per input byte; a slow model), the driver stops taking decoded chunks and
    watches encodes instead, and each decode task pauses once it holds ``CHUNKS_AHEAD`` chunks
    nobody took: the store then holds at most ``max_store_bytes`` plus that many chunks per item
    being decoded (and, for up to a second, the encoded chunks Ray has yet to delete: it frees
    objects in batches). Without it, a dataset of thumbnails could fill the store with crops many
    times its input bytes, and Ray would spill them to disk.
    """
    import ray
    from tqdm import tqdm

    if not max_store_bytes:
        max_store_bytes = int(ray.cluster_resources().get("object_store_memory", 8 << 30)) // 2
    bound = chunk_bound(image_size, variants, chunk_bytes, forward_images)
    so = dict(storage_options or {})
    # Only an outage that outlasted the per-request retries reruns a task; other errors repeat.
    retry = dict(max_retries=3, retry_exceptions=[StorageUnavailable])
    prepare_task = ray.remote(prepare).options(  # a streaming generator of (crops, metadata) pairs
        num_cpus=1, _generator_backpressure_num_objects=2 * CHUNKS_AHEAD, **retry)
    commit_calls = [c.commit.options(retry_exceptions=[StorageUnavailable]) for c in committers]

    stats = RunStats()
    # Items are taken from ``items`` one at a time (a plan of millions of files is an Arrow table;
    # only the items in flight exist as Python objects).
    queue = (items[i] for i in range(len(items)))
    head = next(queue, None)
    decoding: dict = {}  # chunk generator of an item still being read and decoded -> its _Flight
    inflight: dict = {}  # commit ref -> its _Flight
    outstanding = [0] * len(actors)  # chunks sent to each tokenizer whose items are not committed
    unseen: dict = {}  # encode ref -> None: chunks sent to a tokenizer and not seen encoded
    bytes_in_flight = 0
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc="tokenize", unit="shard", dynamic_ncols=True)
    try:
        while head is not None or inflight or decoding:
            full = bool(unseen) and (len(unseen) + 1) * bound > max_store_bytes
            while head is not None and (not (inflight or decoding) or (
                not full and len(decoding) < max_decoding and bytes_in_flight + head.bytes <= max_bytes_in_flight
            )):
                item, head = head, next(queue, None)
                gen = prepare_task.remote(item, variants, image_size, max_pixels, so, chunk_bytes, forward_images)
                decoding[gen] = _Flight(item)
                bytes_in_flight += item.bytes
            # A full store: decoded chunks wait (their tasks pause) while encodes are watched.
            done, _ = ray.wait([*(unseen if full else decoding), *inflight], num_returns=1, fetch_local=False)
            if done[0] in unseen:  # and any others done by now, in one look (the dict may be long)
                ready, _ = ray.wait(list(unseen), num_returns=len(unseen), timeout=0, fetch_local=False)
                for ref in ready:
                    del unseen[ref]
                continue
            if done[0] in decoding:  # a chunk (or the end) of an item being decoded
                gen, flight = done[0], decoding[done[0]]
                try:
                    ref = next(gen)
                except StopIteration:  # decoded: its CPU is free for the next item; commit when encoded
                    del decoding[gen]
                    call = commit_calls[len(inflight) % len(commit_calls)]
                    inflight[call.remote(flight.item, output, fmt, variants, so, len(flight.metas),
                                         *flight.metas, *flight.tokens)] = flight
                    continue
                if len(flight.metas) == len(flight.tokens):  # crops: to the least-loaded tokenizer
                    target = min(range(len(actors)), key=outstanding.__getitem__)
                    flight.tokens.append(actors[target].encode.remote(ref, variants))
                    flight.targets.append(target)
                    outstanding[target] += 1
                    unseen[flight.tokens[-1]] = None
                    stats.peak_store_bytes = max(stats.peak_store_bytes, len(unseen) * bound)
                else:
                    flight.metas.append(ref)
                continue
            flight = inflight.pop(done[0])
            item = flight.item
            bytes_in_flight -= item.bytes
            for target in flight.targets:
                outstanding[target] -= 1
            for ref in flight.tokens:  # committed, so encoded
                unseen.pop(ref, None)
            try:
                record, io = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - sorted below: deterministic errors stop the job
                if _repeats(e):
                    for ref in [*inflight, *decoding]:
                        ray.cancel(ref)
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
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats

