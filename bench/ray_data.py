"""Ray Data's streaming executor against our Ray Core executor, on the tokenization job's data path.

Why: the job's driver loop (:func:`pipelines.producer.ray_tokenize.run_items`) is hand-written
scheduling: admission by stage, input bytes in flight, least-loaded dispatch, one commit per work
item. Ray Data offers the same shape (tasks -> actor pool -> tasks) off the shelf. This measures
what each executor costs the CPU stage that feeds the tokenizers, with the tokenizer itself taken
out: the encoder is a zero-cost stand-in (an actor that returns zeros of the right shape and dtype,
``(N, V, 256) uint16``, without computing), so images/s is the feed rate alone.

On the same JPEGs (made as :func:`bench.pipeline.write_jpegs` makes them), the same work items
(``plan(url, "folder", rows_per_shard)``), the same variants (centre + flip at 336) and the same
per-image CPU work (``read_item``, ``decode_image``, ``source_crops``, the input's SHA-256), in one run:

(a) our executor: ``run_items`` with the stand-in actors, writing real shards and commit records;
(b) Ray Data: ``from_items(work items) -> map_batches(decode, num_cpus=1) -> map_batches(stand-in,
    ActorPoolStrategy) -> map_batches(commit)``, one row per work item, so one shard per item,
    decoded by the job's ``prepare`` (one chunk per item) and written by its ``commit``, so both
    do the same work per image and write the same bytes;
(b2) the same with Ray Data's per-operator resource reservation off: by default it holds CPUs
    back for the operators after decoding, which on a small node caps the decode operator;
(c) the bare baseline: a single-process loop of that per-image work (nothing stacked, shipped or
    written), times the cores.

Printed: images/s of each (medians over ``--rounds``; the executors' order rotates each round and
(c) runs each round too, with Ray up and idle, since the cores are shared and the load drifts),
feed efficiency of (a), (b), (b2) over (c), the ratios (b)/(a) and (b2)/(a), when each wrote its
first and last commit record, how many items Ray Data decoded at once, whether all wrote identical
shards, and notes on what Ray Data does on failures. The executors run once unmeasured first (on a
couple of items) so that Ray's worker processes exist and have imported the code; (b)'s figure
includes starting its actor pool (Ray Data starts one per execution), (a)'s actors are started
before the clock.

Run: ``python -m bench.ray_data`` (about 70 s on 2 cores); ``--images 300 --rounds 1`` for a quick look.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# run_items draws a tqdm bar; tqdm reads its TQDM_* defaults when it is imported, so this goes
# before the imports below (one of which imports tqdm).
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from bench.pipeline import write_jpegs  # noqa: E402
from jobs.cli import parse_config, setup_logging  # noqa: E402
from pipelines.contract.manifest import commit_path  # noqa: E402
from pipelines.producer.planning import plan  # noqa: E402
from pipelines.producer.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS, Rejected, decode_image, expand_variants, source_crops, tencrop_size, variant_windows,
)
from pipelines.producer.ray_tokenize import Prepared, commit, prepare, run_items, start_committers  # noqa: E402
from pipelines.producer.sources import WorkItem, read_item, sha256  # noqa: E402
from pipelines.ray_runtime import ray_session  # noqa: E402

log = logging.getLogger("bench.ray_data")

TOKENS_PER_IMAGE = 256
FORMAT = "parquet"


@dataclass
class BenchConfig:
    """Feed throughput of Ray Data's streaming executor versus run_items, with a zero-cost encoder."""

    images: int = field(default=1500, metadata={"help": "JPEGs in the input folder"})
    rows_per_shard: int = field(default=128, metadata={"help": "images per work item"})
    image_size: int = field(default=336, metadata={"help": "crop side"})
    variants: tuple[str, ...] = field(default=("center", "flip"), metadata={"help": "variant sets per image"})
    encoders: int = field(default=1, metadata={"help": "zero-cost encoder actors (every executor)"})
    rounds: int = field(default=3, metadata={"help": "rounds of (c), (a), (b), (b2); figures are medians"})
    warm_up_items: int = field(default=2, metadata={"help": "work items each executor runs unmeasured first"})
    max_bytes_in_flight: int = field(default=4 << 30, metadata={"help": "(a): input bytes in flight (the job's default)"})
    stats: bool = field(default=False, metadata={"help": "log Ray Data's per-operator stats after each of its runs"})


class ZeroEncoder:
    """The tokenizer actor's interface (``info``, ``encode(sources, variants)``) at no cost, so a
    measured rate is what the executor can feed, not what a model can encode."""

    def __init__(self, image_size: int = 336, tokens: int = TOKENS_PER_IMAGE):
        self.image_size = image_size
        self.tokens = tokens

    def info(self) -> dict:
        return {"image_size": self.image_size, "tokens_per_image": self.tokens, "pid": os.getpid()}

    def encode(self, sources: dict[str, np.ndarray], variants: tuple[str, ...]) -> np.ndarray:
        n = len(next(iter(sources.values()))) if sources else 0
        return np.zeros((n, len(variants), self.tokens), np.uint16)


def source_names(size: int, variants: tuple[str, ...]) -> list[str]:
    """The source crops ``variants`` are cut from: Ray Data rows need the same columns in every
    block, even for an item whose every image was rejected."""
    return sorted({source for source, *_ in variant_windows(size, variants)})


def commit_times(out: str, shards, start: float) -> tuple[float, float]:
    """Seconds from ``start`` (``time.time()``) to the first and the last commit record written,
    read from what each executor wrote (one clock for both). The first shows start-up (worker
    processes; for Ray Data also planning and its actor pool) and whether items are committed as
    they go or only after the stage before has run ahead: committed items are what survives a crash."""
    times = sorted(os.stat(commit_path(out, s)).st_mtime - start for s in shards)
    return round(times[0], 2), round(times[-1], 2)


def bare_loop(items: list[WorkItem], variants: tuple[str, ...], size: int) -> tuple[int, float]:
    """(c): read, decode, crop and digest every image in this process, one after another, no Ray:
    the least CPU the job's data path can cost."""
    images = 0
    start = time.perf_counter()
    for item in items:
        for sample in read_item(item):
            if sample.error is None:
                try:
                    source_crops(decode_image(sample.data, DEFAULT_MAX_PIXELS), size, variants)
                except Rejected:
                    continue
                sha256(sample.data)
                images += 1
    return images, time.perf_counter() - start


def our_executor(items: list[WorkItem], out: str, cfg: BenchConfig, variants: tuple[str, ...], cpus: int) -> dict:
    """(a): ``run_items`` as ``run_tokenize`` calls it (max_decoding = 2 x CPUs), with stand-in
    actors that, like the real ones, hold no logical CPU and are restarted by Ray."""
    import ray

    actor_cls = ray.remote(ZeroEncoder)
    actors = [actor_cls.options(num_cpus=0, max_restarts=-1, max_task_retries=-1).remote(cfg.image_size)
              for _ in range(cfg.encoders)]
    committers = start_committers()
    try:
        ray.get([a.info.remote() for a in actors] + [c.requests.remote() for c in committers])
        wall, start = time.time(), time.perf_counter()
        stats = run_items(
            items, actors=actors, committers=committers, image_size=cfg.image_size, output=out, fmt=FORMAT, variants=variants,
            max_pixels=DEFAULT_MAX_PIXELS, storage_options=None, max_decoding=2 * cpus,
            max_bytes_in_flight=cfg.max_bytes_in_flight,
        )
        seconds = time.perf_counter() - start
    finally:
        for a in [*actors, *committers]:
            ray.kill(a)
    if stats.failed:
        raise RuntimeError(f"(a) failed items: {stats.failed}")
    return {"images": stats.images, "seconds": seconds, "commits": commit_times(out, stats.records, wall),
            "sha256": {s: r["sha256"] for s, r in stats.records.items()}}


# --- (b) Ray Data: one row per work item, so one block per item and one shard per row ------------

def decode_item(item: WorkItem, variants: tuple[str, ...], size: int) -> tuple[dict[str, np.ndarray], Prepared]:
    """One work item -> ({source name: uint8 (N, H, W, 3)}, Prepared) by the job's own ``prepare``,
    asked for a single chunk (room for one more than the item's files, so that the chunk never
    fills and ``prepare`` yields exactly one crops-metadata pair): the crops are views of that
    process's reused arrays, valid until its next call, and the rejects are recorded as the job
    records them."""
    sides = {"center": size, "tencrop": tencrop_size(size)}
    per_image = sum(3 * sides[name] ** 2 for name in source_names(size, variants))
    crops, meta = prepare(item, variants, size, DEFAULT_MAX_PIXELS, None, chunk_bytes=(len(item.files) + 1) * per_image)
    return crops, meta


def _decode_rows(batch: dict, variants: tuple[str, ...], size: int, names: list[str]) -> dict:
    """Work item rows -> the items' source crops and metadata. Crops travel as tensor columns (no
    pickling: the object store holds what it holds in (a)); the metadata, small, as pickled bytes;
    ``decode_t``: when each item's decoding began and ended, to count how many ran at once. One row (batch_size=1) ships views of the reused arrays: Ray stores a task's output block
    before the task's process decodes another item; several rows are copied."""
    rows = len(batch["item"])
    out: dict[str, list] = {"item": [], "meta": [], "decode_t": [], **{n: [] for n in names}}
    for text in batch["item"]:
        t0 = time.time()
        crops, meta = decode_item(WorkItem.from_dict(json.loads(text)), variants, size)
        out["decode_t"].append((t0, time.time()))
        out["item"].append(text)
        out["meta"].append(pickle.dumps(meta))
        for n in names:
            c = crops.get(n, np.zeros((0, size, size, 3), np.uint8))
            out[n].append(c if rows == 1 else c.copy())
    return {k: ((v[0][None] if rows == 1 else np.stack(v)) if k in names else
                np.array(v, dtype=np.float64 if k == "decode_t" else object))
            for k, v in out.items()}


class ZeroEncoderUDF:
    """The stand-in as a Ray Data callable class (one per pool actor); crops in, tokens out, the
    crops dropped so that only tokens reach the commit stage, as in (a)."""

    def __init__(self, variants: tuple[str, ...], size: int, names: list[str]):
        self.encoder = ZeroEncoder(size)
        self.variants = variants
        self.names = names

    def __call__(self, batch: dict) -> dict:
        tokens = [self.encoder.encode({n: batch[n][i] for n in self.names}, self.variants)
                  for i in range(len(batch["item"]))]
        return {"item": batch["item"], "meta": batch["meta"], "decode_t": batch["decode_t"], "tokens": np.stack(tokens)}


def _commit_rows(batch: dict, output: str, variants: tuple[str, ...]) -> dict:
    """Each row's commit; rows out are the records' scalars only (tensor shapes differ between
    items; scalars keep the output blocks uniform)."""
    out: dict[str, list] = {"shard": [], "rows": [], "sha256": [], "decode_t": list(batch["decode_t"])}
    for text, blob, tokens in zip(batch["item"], batch["meta"], batch["tokens"]):
        record, _ = commit(WorkItem.from_dict(json.loads(text)), output, FORMAT, variants, None, 1, pickle.loads(blob), tokens)
        out["shard"].append(record["shard"])
        out["rows"].append(record["rows"])
        out["sha256"].append(record["sha256"] or "")
    return {k: np.array(v, dtype={"rows": np.int64, "decode_t": np.float64}.get(k, object)) for k, v in out.items()}


def quiet_ray_data() -> None:
    """No progress bars, no per-execution banners or stats dumps: the bench prints one JSON."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.verbose_progress = False
    # ERROR: Ray Data warns once per process that progress bars are off (they are, on purpose).
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def peak_overlap(spans) -> int:
    """The most intervals (start, end) open at one time."""
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def ray_data_executor(items: list[WorkItem], out: str, cfg: BenchConfig, variants: tuple[str, ...],
                      reservation: bool = True) -> dict:
    """(b): the same three steps as a Ray Data pipeline with the same resource shapes as (a):
    decode 1 CPU, encoder actors 0 CPU, commit 0.25 CPU; batch_size=1 keeps a work item whole.
    ``reservation=False`` turns off Ray Data's per-operator resource reservation, which by default
    holds part of the CPUs back for the operators downstream of decoding."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = reservation
    try:
        return _run_ray_data(items, out, cfg, variants)
    finally:
        ctx.op_resource_reservation_enabled = saved


def _run_ray_data(items: list[WorkItem], out: str, cfg: BenchConfig, variants: tuple[str, ...]) -> dict:
    import ray.data

    names = source_names(cfg.image_size, variants)
    wall, start = time.time(), time.perf_counter()
    ds = (
        ray.data.from_items([{"item": json.dumps(asdict(i))} for i in items], override_num_blocks=len(items))
        .map_batches(_decode_rows, batch_size=1, num_cpus=1, batch_format="numpy",
                     fn_kwargs={"variants": variants, "size": cfg.image_size, "names": names})
        .map_batches(ZeroEncoderUDF, batch_size=1, num_cpus=0, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=cfg.encoders),
                     fn_constructor_kwargs={"variants": variants, "size": cfg.image_size, "names": names})
        .map_batches(_commit_rows, batch_size=1, num_cpus=0.25, batch_format="numpy",
                     fn_kwargs={"output": out, "variants": variants})
    )
    rows = ds.take_all()  # consumes the stream; the committed rows are small
    seconds = time.perf_counter() - start
    if cfg.stats:
        log.info("Ray Data stats:\n%s", ds.stats())
    return {"images": int(sum(r["rows"] for r in rows)), "seconds": seconds,
            "commits": commit_times(out, [r["shard"] for r in rows], wall),
            "decode_peak": peak_overlap([tuple(r["decode_t"]) for r in rows]),
            "sha256": {r["shard"]: (r["sha256"] or None) for r in rows}}


# What Ray Data does on failures: from its docs and DataContext (Ray 2.60), and checked on a small
# case (6 items, the commit of the third raising).
RAY_DATA_NOTES = {
    "system_failures": "map tasks are submitted with max_retries=-1 and RaySystemError retried; pool actors get "
                       "max_restarts=-1, max_task_retries=-1: a lost worker or node reruns the block's task, so a "
                       "commit UDF can run twice for one item (ours is idempotent: same bytes, same name, record last)",
    "application_errors": "not retried by default (DataContext.retried_map_errors=False, max_map_retries=0; retries "
                          "match exception messages by substring/regex, not exception types); the first UDF "
                          "exception aborts the whole execution (items committed before it stay, the rest are not "
                          "committed) and reaches the driver as RayTaskError(UserCodeException), not as the UDF's "
                          "exception class, so run_items' triage (storage fault vs an error that repeats) would need "
                          "raise_original_map_exception or the cause chain",
    "max_errored_blocks": "if > 0, a block whose UDF raised is dropped and the run goes on: the item is missing from "
                          "the output rows (one ERROR log line), not listed as failed; the driver must diff commit "
                          "records against the plan to find it",
    "exactly_once": "not provided by Ray Data: per-item exactly-once still comes from our commit records (one row = "
                    "one block = one shard only because batch_size=1 and one block per item); resume needs our own "
                    "filter of committed items (Ray Data's CheckpointConfig tracks row ids, not shard commits)",
    "resource_reservation": "by default Ray Data reserves each operator a share of the CPUs and object store "
                            "(op_resource_reservation_ratio=0.5, split over the operators); here, on 2 CPUs, that "
                            "let the 1-CPU decode operator run one task at a time (see ray_data_items_decoding_at_once_by_round); "
                            "with it off decoding takes both CPUs but the 0.25-CPU commit operator waits for a free "
                            "CPU, so commits bunch up after decoding (see the first/last commit times)",
    "backpressure": "by object-store bytes per operator (resource reservation, op_resource_reservation_ratio=0.5 of "
                    "the store limit) and task/actor concurrency, not by input bytes of items; no least-loaded "
                    "dispatch knob beyond max_tasks_in_flight_per_actor",
}


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


# The executors measured, in the order of round 0 (later rounds rotate it): label -> description.
EXECUTORS = {
    "a_run_items": "(a) run_items",
    "b_ray_data": "(b) Ray Data, default DataContext",
    "b2_ray_data_no_reservation": "(b2) Ray Data, op_resource_reservation_enabled=False",
}


def run(cfg: BenchConfig) -> dict:
    """Rounds of (c) then the executors on one Ray instance. The executors' order rotates every
    round and each figure is the median over rounds, since the cores are shared and the load drifts."""
    variants = expand_variants(cfg.variants)
    rates: dict[str, list[float]] = {k: [] for k in ("c_bare_single_process", *EXECUTORS)}
    commits: dict[str, list] = {k: [] for k in EXECUTORS}
    peaks: dict[str, list] = {k: [] for k in EXECUTORS if k != "a_run_items"}
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "in", cfg.images)
        planned = plan(str(tmp / "in"), "folder", cfg.rows_per_shard)
        items = [planned[i] for i in range(len(planned))]  # a list, or a Plan (a sequence of WorkItems)
        log.info("%d images in %d work items of %d; variants %s at %d; %d rounds", cfg.images, len(items),
                 cfg.rows_per_shard, ",".join(variants), cfg.image_size, cfg.rounds)
        with ray_session() as ray:
            quiet_ray_data()
            cpus = int(ray.cluster_resources().get("CPU", 1))
            execute = {
                "a_run_items": lambda out, todo: our_executor(todo, out, cfg, variants, cpus),
                "b_ray_data": lambda out, todo: ray_data_executor(todo, out, cfg, variants),
                "b2_ray_data_no_reservation": lambda out, todo: ray_data_executor(todo, out, cfg, variants, False),
            }
            for name in ("a_run_items", "b_ray_data"):
                execute[name](str(tmp / f"warm-{name}"), items[: cfg.warm_up_items])
            order = list(EXECUTORS)
            for r in range(cfg.rounds):
                # (c) with Ray up but idle: the machine state the executors run in.
                c_images, c_seconds = bare_loop(items, variants, cfg.image_size)
                rates["c_bare_single_process"].append(c_images / c_seconds)
                log.info("round %d (c) bare loop: %.1f img/s in one process, x %d cores = %.1f img/s", r,
                         c_images / c_seconds, cpus, c_images / c_seconds * cpus)
                done = {}
                for name in order[r % len(order):] + order[: r % len(order)]:
                    d = done[name] = execute[name](str(tmp / f"out-{name}-{r}"), items)
                    rates[name].append(d["images"] / d["seconds"])
                    commits[name].append(d["commits"])
                    if name in peaks:
                        peaks[name].append(d["decode_peak"])
                    log.info("round %d %s: %d images in %.2f s = %.1f img/s; commits from %.2f to %.2f s%s", r,
                             EXECUTORS[name], d["images"], d["seconds"], rates[name][-1], *d["commits"],
                             f"; at most {d['decode_peak']} items decoding at once" if name in peaks else "")
                identical &= all(d["sha256"] == done["a_run_items"]["sha256"] and d["images"] == c_images
                                 for d in done.values())
    median = {k: _median(v) for k, v in rates.items()}
    bare = median["c_bare_single_process"] * cpus
    result = {
        "images": cfg.images,
        "work_items": len(items),
        "rows_per_shard": cfg.rows_per_shard,
        "variants": list(variants),
        "image_size": cfg.image_size,
        "cores": cpus,
        "encoders": cfg.encoders,
        "rounds": cfg.rounds,
        "images_per_s_median": {**{k: round(v, 1) for k, v in median.items()}, "c_bare_x_cores": round(bare, 1)},
        "images_per_s_by_round": {k: " ".join(f"{x:.1f}" for x in v) for k, v in rates.items()},
        "first_and_last_commit_s_by_round": {k: " ".join(f"{f:.2f}/{t:.2f}" for f, t in v) for k, v in commits.items()},
        "ray_data_items_decoding_at_once_by_round": {k: " ".join(map(str, v)) for k, v in peaks.items()},
        "feed_efficiency_over_c": {k: round(median[k] / bare, 3) for k in EXECUTORS},
        "ratio_b_over_a": round(median["b_ray_data"] / median["a_run_items"], 3),
        "ratio_b2_over_a": round(median["b2_ray_data_no_reservation"] / median["a_run_items"], 3),
        "identical_outputs": identical,
        "ray_data_notes": RAY_DATA_NOTES,
    }
    print(json.dumps(result, indent=1))
    return result


def main(argv=None) -> dict:
    setup_logging()
    return run(parse_config(BenchConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
