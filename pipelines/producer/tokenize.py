"""Driver logic of the tokenization job: plan, resume, run on Ray, publish the manifest.

Resuming is the normal path, not a special mode: the plan (work items and the settings that
shape the output) is stored in the output folder on the first run; every later run with the same
settings loads it, skips the items that already have a commit record and redoes the rest.

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
    check_compatible,
    load_commits,
    read_commit,
    write_manifest,
)
from pipelines.producer.ray_tokenize import RunStats, TokenizerSpec, run_items, start_workers
from pipelines.contract.shards import SHARD_FORMATS
from pipelines.producer.sources import Columns, WorkItem, detect_format, folder_classes, plan
from pipelines.contract.redact import redact_url
from pipelines.contract.retry import counting, summarize
from pipelines.contract.storage import exists, filesystem, join, read_json, remove, remove_stale_temporaries, write_json

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


@dataclass
class Plan:
    items: list[WorkItem]
    classes: list[str]  # a folder input's class names (label i is classes[i]); [] otherwise
    stored: dict | None  # the plan file of an earlier run, when there is one


def _load_or_plan(fs, root: str, opts: TokenizeOptions, input_format: str) -> Plan:
    """The stored plan of an earlier run, or a new one (not stored here)."""
    path = join(root, PLAN)
    if exists(fs, path):
        stored = read_json(fs, path)
        return Plan([WorkItem.from_dict(d) for d in stored["items"]], stored.get("classes", []), stored)
    items = plan(opts.input, input_format, opts.rows_per_shard, opts.storage_options, opts.columns)
    classes = folder_classes([f for i in items for f in i.files]) if input_format == "folder" else []
    return Plan(items, classes, None)


def _prepare_output(opts: TokenizeOptions, identity: dict) -> Plan:
    """Check (or clear) an existing output and return the plan, creating it on the first run."""
    fs, root = filesystem(opts.output, opts.storage_options)
    if opts.overwrite and exists(fs, root):
        log.warning("--overwrite: deleting %s", redact_url(opts.output))
        remove(fs, root)
    if exists(fs, join(root, MANIFEST)):
        check_compatible(read_json(fs, join(root, MANIFEST)), identity, opts.output)
    removed = remove_stale_temporaries(fs, root)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    p = _load_or_plan(fs, root, opts, identity["input_format"])  # the stored plan is read once
    if p.stored is not None:
        check_compatible(p.stored["identity"], identity, opts.output)
        log.info("resuming: %d work items planned earlier", len(p.items))
        return p
    write_json(fs, join(root, PLAN), {"identity": identity, "items": [i.to_dict() for i in p.items], "classes": p.classes})
    log.info("planned %d work items from %s (%s)", len(p.items), redact_url(opts.input), identity["input_format"])
    return p


def dry_run(opts: TokenizeOptions) -> dict:
    """What a run would do, without starting Ray or writing anything: the plan (an earlier run's, or
    a new one), its inputs and bytes, and what a resume would skip."""
    input_format = opts.input_format or detect_format(opts.input, opts.storage_options)
    fs, root = filesystem(opts.output, opts.storage_options)
    p = _load_or_plan(fs, root, opts, input_format)
    commits = load_commits(fs, root) if p.stored is not None else {}
    todo = [i for i in p.items if i.shard not in commits]
    settings = _settings(opts, input_format)
    stored = (p.stored or {}).get("identity", {})
    if input_format == "folder":
        inputs = sum(len(i.files) for i in p.items)
    elif input_format == "lmdb":
        inputs = sum(i.stop - i.start for i in p.items)
    else:
        inputs = len({i.url for i in p.items})
    return {
        "input": redact_url(opts.input),
        "input_format": input_format,
        "output": redact_url(opts.output),
        "plan": "stored by an earlier run" if p.stored is not None else "new",
        "settings_that_differ_from_the_stored_plan": sorted(k for k in settings if p.stored and stored.get(k) != settings[k]),
        "inputs": inputs,
        "input_bytes": sum(i.bytes for i in p.items),
        "work_items": len(p.items),
        "classes": len(p.classes),
        "committed_items": len(p.items) - len(todo),
        "to_do": {"work_items": len(todo), "input_bytes": sum(i.bytes for i in todo)},
    }


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
        # The tokenizer's fingerprint decides whether an existing output may be extended, so the
        # actors start (and report it) before the output is touched.
        actors = start_workers(opts.spec, opts.workers, opts.gpus_per_worker, threads, opts.batch_size)
        try:
            info = ray.get(actors[0].info.remote())
            identity = _identity(opts, info, input_format)
            planned = _prepare_output(opts, identity)
            items = planned.items
            fs, root = filesystem(opts.output, opts.storage_options)
            commits = load_commits(fs, root)
            todo = [i for i in items if i.shard not in commits]
            log.info("%d of %d work items already committed; %d to do", len(items) - len(todo), len(items), len(todo))
            stats = RunStats()
            if todo:
                stats = run_items(
                    todo, actors=actors, image_size=info["image_size"], output=opts.output, fmt=opts.format,
                    variants=variants, max_pixels=opts.max_pixels, storage_options=opts.storage_options,
                    # One decoding per CPU and one more queued behind each, so none waits for the driver.
                    max_decoding=2 * cpus,
                    max_bytes_in_flight=opts.max_bytes_in_flight,
                )
        finally:
            for actor in actors:
                ray.kill(actor)
        commits.update(stats.records)
        # A failed call may still have committed (its result was lost, not its writes): ask.
        for failure in stats.failed:
            record = read_commit(fs, root, failure["shard"])
            if record is not None:
                commits[record["shard"]] = record
        manifest = build_manifest(identity, info["config"], info["codebook_size"], commits, len(items), planned.classes)
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
        },
    }
    return summary



__all__ = ["IncompatibleOutput", "TokenizeOptions", "TokenizerSpec", "dry_run", "run_tokenize"]
