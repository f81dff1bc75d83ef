"""The output dataset's layout, its manifest, and the refusal to mix tokenizers.

    <output>/manifest.json               what a reader trusts: committed shards, checksums, totals
    <output>/shards/shard-NNNNNN.parquet  (or .tar) one per work item
    <output>/rejects/shard-NNNNNN.parquet rejected inputs of that work item
    <output>/_state/plan.json             the work items and the settings they were planned with
    <output>/_state/commits/shard-NNNNNN.json  written last: the item's commit record

A shard counts only once its commit record exists, and the record is written after the shard and
its rejects, so a crash at any point leaves either a committed item or one that is redone.
"""

from __future__ import annotations

from collections import Counter

from pipelines.shards import FORMAT_VERSION
from pipelines.storage import join, read_json, write_json

MANIFEST = "manifest.json"
PLAN = "_state/plan.json"
COMMITS = "_state/commits"
# Settings that change the tokens or the layout: a rerun must match them to reuse the output.
IDENTITY_KEYS = ("fingerprint", "variants", "format", "tokens_per_image", "input", "input_format", "rows_per_shard")


class IncompatibleOutput(RuntimeError):
    """The output folder was written with other settings (tokenizer, variants, ...)."""


def check_compatible(existing: dict, wanted: dict, where: str) -> None:
    diffs = [f"{k}: existing {existing.get(k)!r} vs now {wanted.get(k)!r}" for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]
    if diffs:
        raise IncompatibleOutput(
            f"{where} was written with different settings ({'; '.join(diffs)}). "
            "Use another output, or pass --overwrite to delete it and start over."
        )


def load_commits(fs, root: str) -> dict[str, dict]:
    path = join(root, COMMITS)
    if not fs.exists(path):
        return {}
    return {rec["shard"]: rec for rec in (read_json(fs, p) for p in sorted(fs.find(path)) if p.endswith(".json"))}


def build_manifest(identity: dict, tokenizer_config: dict, codebook_size: int, commits: dict[str, dict], planned: int) -> dict:
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
    }


def write_manifest(fs, root: str, manifest: dict) -> None:
    write_json(fs, join(root, MANIFEST), manifest)
