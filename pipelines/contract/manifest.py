"""The output dataset's layout, its manifest, and the refusal to mix tokenizers.

    <output>/manifest.json               what a reader trusts: committed shards, checksums, totals;
                                          written when a run starts (``complete: false``) and when it ends
    <output>/shards/shard-NNNNNN.parquet  (or .tar) one per work item
    <output>/rejects/shard-NNNNNN.parquet rejected inputs of that work item
    <output>/_state/plan.parquet          the work items, and the settings they were planned with
    <output>/_state/commits/shard-NNNNNN.json  written last: the item's commit record

A shard counts only once its commit record exists, and the record is written after the shard and
its rejects are verifiably in place (see :func:`pipelines.contract.storage.atomic_write`), so a crash or a
store fault at any point leaves either a committed item or one that is redone.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from pipelines.contract.shards import FORMAT_VERSION, ShardRows, parquet_bytes, rejects_bytes, webdataset_bytes
from pipelines.contract.storage import atomic_write, exists, filesystem, find, is_temporary, join, read_json, write_json

MANIFEST = "manifest.json"
PLAN = "_state/plan.parquet"
COMMITS = "_state/commits"
# Settings that change the tokens or the layout: a rerun must match them to reuse the output.
COMMIT_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes; a larger one is not ours
IDENTITY_KEYS = (
    "fingerprint", "variants", "format", "tokens_per_image", "input", "input_format", "rows_per_shard", "columns",
)


class IncompatibleOutput(RuntimeError):
    """The output folder was written with other settings (tokenizer, variants, ...)."""


def incompatibilities(earlier: Iterable[dict], wanted: dict) -> list[str]:
    """The settings in which the earlier records (the manifest, the stored plan's identity) differ
    from ``wanted``, each once."""
    return list(dict.fromkeys(
        f"{k}: existing {e.get(k)!r} vs now {wanted.get(k)!r}" for k in IDENTITY_KEYS for e in earlier if e.get(k) != wanted.get(k)
    ))


def refusal(where: str, diffs: list[str]) -> IncompatibleOutput:
    return IncompatibleOutput(
        f"{where} was written with different settings ({'; '.join(diffs)}). "
        "Use another output, or pass --overwrite to delete it and start over."
    )


def commit_path(root: str, shard: str) -> str:
    return join(root, COMMITS, f"{shard}.json")


def read_commit(fs, root: str, shard: str) -> dict | None:
    """One item's commit record, read fresh, or None if the item is not committed."""
    path = commit_path(root, shard)
    return read_json(fs, path, COMMIT_RECORD_BYTES) if exists(fs, path) else None


def load_commits(fs, root: str) -> dict[str, dict]:
    """Every commit record under ``root``: one fresh listing, then the records read in parallel
    (on S3 each is a request; a resumed ImageNet-21k run has thousands). A local committer's
    file in progress is not a record: a follower lists the folder while the job writes to it."""
    folder = join(root, COMMITS)
    if not exists(fs, folder):
        return {}
    paths = sorted(p for p in find(fs, folder) if p.endswith(".json") and not is_temporary(p))
    with ThreadPoolExecutor(max_workers=16) as pool:
        records = list(pool.map(lambda p: read_json(fs, p, COMMIT_RECORD_BYTES), paths))
    return {rec["shard"]: rec for rec in records}


def build_manifest(
    identity: dict, tokenizer_config: dict, codebook_size: int, commits: dict[str, dict], planned: int,
    classes: list[str] | None = None,
) -> dict:
    """``classes``: a folder input's class names (label i is ``classes[i]``), kept for readers."""
    records = [commits[k] for k in sorted(commits)]
    rejects = Counter()
    for r in records:
        rejects.update(r["rejects_by_reason"])
    return {
        "format_version": FORMAT_VERSION,
        **identity,
        "tokenizer_config": tokenizer_config,
        "codebook_size": codebook_size,
        "shards": [
            {k: r[k] for k in ("shard", "path", "rows", "bytes", "sha256", "rejects", "rejects_path")}
            for r in records
            if r["rows"] or r["rejects"]
        ],
        "totals": {
            "images": sum(r["rows"] for r in records),
            "rejects": sum(r["rejects"] for r in records),
            "rejects_by_reason": dict(sorted(rejects.items())),
            "bytes": sum(r["bytes"] for r in records),
            "work_items": planned,
            "committed_items": len(records),
        },
        "complete": len(records) == planned,
        **({"classes": classes} if classes else {}),
    }


def write_manifest(fs, root: str, manifest: dict) -> None:
    write_json(fs, join(root, MANIFEST), manifest)


def commit_shard(
    fs, root: str, shard: str, rows: ShardRows | None, fmt: str, variants, rejects: list[dict] = (), unit: str = ""
) -> dict:
    """Write one work item's shard and rejects, then the commit record that makes them count."""
    rejects = list(rejects)
    record = {"shard": shard, "unit": unit, "rows": len(rows) if rows else 0, "rejects": len(rejects),
              "path": None, "bytes": 0, "sha256": None, "rejects_path": None,
              "rejects_by_reason": dict(Counter(r["reason"] for r in rejects))}
    if rows:
        data = parquet_bytes(rows) if fmt == "parquet" else webdataset_bytes(rows, tuple(variants))
        rel = f"shards/{shard}.{'parquet' if fmt == 'parquet' else 'tar'}"
        atomic_write(fs, join(root, rel), data)
        record.update(path=rel, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if rejects:
        rel = f"rejects/{shard}.parquet"
        atomic_write(fs, join(root, rel), rejects_bytes(rejects))
        record["rejects_path"] = rel
    write_json(fs, commit_path(root, shard), record)
    return record


def write_dataset(
    url: str, shards: list[ShardRows], identity: dict, codebook_size: int, storage_options: Mapping | None = None
) -> dict:
    """A complete token dataset from rows already in memory (one shard per entry); returns the
    manifest. Handy for converting other token caches, and for tests and benchmarks."""
    fs, root = filesystem(url, storage_options)
    commits = {}
    for i, rows in enumerate(shards):
        name = f"shard-{i:06d}"
        commits[name] = commit_shard(fs, root, name, rows, identity["format"], identity["variants"])
    manifest = build_manifest(identity, {}, codebook_size, commits, len(shards))
    write_manifest(fs, root, manifest)
    return manifest
