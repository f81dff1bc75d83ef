"""Driver logic of the tokenization job: plan, resume, run on Ray, publish the manifest.

Resuming is the normal path, not a special mode: the plan (work items and the settings that
shape the output) is stored in the output folder on the first run; every later run with the same
settings loads it, skips the items that already have a commit record and redoes the rest. With
``extend`` the input is listed again and what appeared since is planned after the stored items.

The manifest is built from one fresh listing of the commit records taken at the start plus the
records this run's commit tasks returned, never from a second listing: an object store's listing
may lag behind (or a client may cache it), and what this run wrote it already knows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from pipelines.producer.images import DEFAULT_MAX_PIXELS, expand_variants
from pipelines.contract.manifest import (
    MANIFEST,
    PLAN,
    IncompatibleOutput,
    build_manifest,
    incompatibilities,
    load_commits,
    read_commit,
    refusal,
    write_manifest,
)
from pipelines.producer.planning import Growth, Plan, extend, plan
from pipelines.producer.ray_tokenize import CHUNK_BYTES, RunStats, run_items, start_committers, start_workers, tokenizer_info
from pipelines.producer.worker import TokenizerSpec
from pipelines.contract.shards import SHARD_FORMATS
from pipelines.producer.sources import Columns, detect_format
from pipelines.contract.redact import redact_url
from pipelines.contract.retry import counting, summarize
from pipelines.contract.storage import (
    atomic_write, exists, filesystem, join, read_bytes, read_json, remove, remove_stale_temporaries,
)

log = logging.getLogger(__name__)


@dataclass
class TokenizeOptions:
    input: str
    output: str
    format: str = "parquet"
    input_format: str | None = None
    variants: tuple[str, ...] = ("center",)
    spec: TokenizerSpec = field(default_factory=TokenizerSpec)
    batch_size: int = 64
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads: int = 0  # torch threads per actor (0: the machine's cores / workers)
    rows_per_shard: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: Mapping | None = None
    overwrite: bool = False
    columns: Columns = field(default_factory=Columns)
    max_bytes_in_flight: int = 4 << 30  # input bytes of the work items in flight (see run_items)
    max_store_bytes: int = 0  # crop bytes awaiting tokenizers in the object store (0: half of it; see run_items)
    chunk_bytes: int = CHUNK_BYTES  # source-crop bytes per encode call (see prepare)
    extend: bool = False  # plan the inputs that appeared since the stored plan was made


def _settings(opts: TokenizeOptions, input_format: str) -> dict:
    """The identity keys that come from the command line (the tokenizer adds the rest)."""
    named = {k: v for k, v in asdict(opts.columns).items() if v is not None}
    return {
        "variants": list(expand_variants(opts.variants)),
        "format": opts.format,
        "input": redact_url(opts.input),
        "input_format": input_format,
        "rows_per_shard": opts.rows_per_shard,
        "columns": named or None,
    }


def _identity(opts: TokenizeOptions, info: dict, input_format: str) -> dict:
    return {"fingerprint": info["fingerprint"], "tokens_per_image": info["tokens_per_image"], **_settings(opts, input_format)}


MAX_PLAN_BYTES = 4 << 30  # ImageNet-21k's plan is a few hundred MB


@dataclass
class Planned:
    plan: Plan
    stored: dict | None  # the identity an earlier run stored its plan with; None for a new plan
    growth: Growth | None = None  # what ``extend`` added and found


def _plan(opts: TokenizeOptions, input_format: str) -> Planned:
    """The stored plan of an earlier run (extended when asked), or a new one; nothing is written."""
    fs, root = filesystem(opts.output, opts.storage_options)
    path = join(root, PLAN)
    if not exists(fs, path):
        return Planned(plan(opts.input, input_format, opts.rows_per_shard, opts.storage_options, opts.columns), None)
    stored, identity = Plan.from_parquet(read_bytes(fs, path, MAX_PLAN_BYTES))
    if not opts.extend:
        return Planned(stored, identity)
    growth = extend(stored, opts.input, input_format, opts.rows_per_shard, opts.storage_options, opts.columns)
    return Planned(growth.plan, identity, growth)


def _report_growth(growth: Growth | None) -> None:
    if growth is None:
        return
    log.info("--extend: %d new inputs in %d new work items%s", growth.new_inputs, growth.new_items,
             f" (new classes appended: {', '.join(growth.new_classes)})" if growth.new_classes else "")
    for what, names in (("vanished", growth.vanished), ("changed size", growth.changed)):
        if names:
            log.warning("%d planned inputs %s since planning (kept out; what was committed stays): %s%s",
                        len(names), what, ", ".join(names[:5]), " ..." if len(names) > 5 else "")


def _settle_existing(opts: TokenizeOptions, identity: dict, planned: Planned, input_format: str) -> Planned:
    """An output written earlier with these settings is resumed; one written with other settings is
    refused, or under --overwrite deleted and planned anew (so a restart of a script that always
    passes it never throws away committed work). Returns the plan to run."""
    fs, root = filesystem(opts.output, opts.storage_options)
    earlier = [read_json(fs, join(root, MANIFEST))] if exists(fs, join(root, MANIFEST)) else []
    diffs = incompatibilities(earlier + ([planned.stored] if planned.stored is not None else []), identity)
    if not diffs:
        return planned
    if not opts.overwrite:
        raise refusal(opts.output, diffs)
    log.warning("--overwrite: deleting %s, written with other settings (%s)", redact_url(opts.output), "; ".join(diffs))
    remove(fs, root)
    return _plan(opts, input_format)


def _prepare_output(opts: TokenizeOptions, identity: dict, planned: Planned) -> None:
    """Store the plan if it is new or grew (the output's settings are ``identity``'s, see
    :func:`_settle_existing`)."""
    fs, root = filesystem(opts.output, opts.storage_options)
    removed = remove_stale_temporaries(fs, root)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    if planned.stored is not None:
        log.info("resuming: %d work items planned earlier", len(planned.plan) - (planned.growth.new_items if planned.growth else 0))
        _report_growth(planned.growth)
        if not (planned.growth and planned.growth.new_items):
            return
    atomic_write(fs, join(root, PLAN), planned.plan.to_parquet(identity))
    log.info("planned %d work items from %s (%s)", len(planned.plan), redact_url(opts.input), identity["input_format"])


def dry_run(opts: TokenizeOptions) -> dict:
    """What a run would do, without starting Ray or writing anything: the plan (an earlier run's, or
    a new one), its inputs and bytes, and what a resume would skip."""
    input_format = opts.input_format or detect_format(opts.input, opts.storage_options)
    fs, root = filesystem(opts.output, opts.storage_options)
    planned = _plan(opts, input_format)
    p = planned.plan
    commits = load_commits(fs, root) if planned.stored is not None else {}
    todo = [n for n, shard in zip(p.item_bytes, p.shards) if shard not in commits]
    settings = _settings(opts, input_format)
    stored = planned.stored or {}
    report = {
        "input": redact_url(opts.input),
        "input_format": input_format,
        "output": redact_url(opts.output),
        "plan": "stored by an earlier run" if planned.stored is not None else "new",
        "settings_that_differ_from_the_stored_plan": sorted(k for k in settings if planned.stored and stored.get(k) != settings[k]),
        "inputs": p.inputs(),
        "input_bytes": sum(p.item_bytes),
        "work_items": len(p),
        "classes": len(p.classes),
        "committed_items": len(p) - len(todo),
        "to_do": {"work_items": len(todo), "input_bytes": sum(todo)},
    }
    if planned.growth is not None:
        report["extend"] = planned.growth.report()
    return report


def run_tokenize(opts: TokenizeOptions) -> dict:
    """Run (or resume) the job on the connected Ray cluster; returns the summary."""
    import ray

    if opts.format not in SHARD_FORMATS:
        raise ValueError(f"--format must be one of {SHARD_FORMATS}")
    variants = expand_variants(opts.variants)
    # Storage requests made here, by the driver itself (the tasks report their own).
    with counting() as driver_io:
        input_format = opts.input_format or detect_format(opts.input, opts.storage_options)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = opts.threads or max(1, cpus // max(1, opts.workers))
        # The actors load their weights while the driver lists and plans the input; the tokenizer's
        # fingerprint (which decides whether an existing output may be extended) is asked after.
        actors = start_workers(opts.spec, opts.workers, opts.gpus_per_worker, threads, opts.batch_size)
        committers = start_committers()
        try:
            planned = _plan(opts, input_format)
            info = tokenizer_info(actors[0])
            identity = _identity(opts, info, input_format)
            planned = _settle_existing(opts, identity, planned, input_format)
            _prepare_output(opts, identity, planned)
            items = planned.plan
            fs, root = filesystem(opts.output, opts.storage_options)
            commits = load_commits(fs, root)
            todo = items.select([i for i, shard in enumerate(items.shards) if shard not in commits])
            log.info("%d of %d work items already committed; %d to do", len(items) - len(todo), len(items), len(todo))
            # The manifest exists from the start, marked incomplete until the end: a trainer refuses
            # the dataset until then, or follows its commits with --follow.
            write_manifest(fs, root, build_manifest(identity, info["config"], info["codebook_size"], commits, len(items), items.classes))
            stats = RunStats()
            if len(todo):
                stats = run_items(
                    todo, actors=actors, committers=committers, image_size=info["image_size"], output=opts.output, fmt=opts.format,
                    variants=variants, max_pixels=opts.max_pixels, storage_options=opts.storage_options,
                    # One decoding per CPU and one more queued behind each, so none waits for the driver.
                    max_decoding=2 * cpus,
                    max_bytes_in_flight=opts.max_bytes_in_flight, max_store_bytes=opts.max_store_bytes,
                    chunk_bytes=opts.chunk_bytes,
                    forward_images=max(1, opts.batch_size // len(variants)),  # as the tokenizer batches
                )
            for counts in ray.get([c.requests.remote() for c in committers]):
                stats.io.update(counts)  # the commits' writes (see Committer)
        finally:
            for actor in [*actors, *committers]:
                ray.kill(actor)
        commits.update(stats.records)
        # A failed call may still have committed (its result was lost, not its writes): ask.
        for failure in stats.failed:
            record = read_commit(fs, root, failure["shard"])
            if record is not None:
                commits[record["shard"]] = record
        manifest = build_manifest(identity, info["config"], info["codebook_size"], commits, len(items), items.classes)
        write_manifest(fs, root, manifest)
    stats.io.update(driver_io)
    totals = manifest["totals"]
    summary = {
        "output": redact_url(opts.output),
        "images": totals["images"],
        "variants": identity["variants"],
        "rejects": totals["rejects"],
        "rejects_by_reason": totals["rejects_by_reason"],
        "shards": len(manifest["shards"]),
        "bytes": totals["bytes"],
        "complete": manifest["complete"],
        "this_run": {
            "images": stats.images,
            "seconds": round(stats.seconds, 2),
            "images_per_s": round(stats.images / stats.seconds, 2) if stats.seconds else 0.0,
            "failed_items": stats.failed,
            "rejects_by_reason": dict(Counter(stats.rejects)),
            "storage": summarize(stats.io),
            "peak_store_bytes": stats.peak_store_bytes,
        },
    }
    if planned.growth is not None:
        summary["extend"] = planned.growth.report()
    return summary



__all__ = ["IncompatibleOutput", "TokenizeOptions", "TokenizerSpec", "dry_run", "run_tokenize"]
