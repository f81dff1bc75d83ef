"""Tokenize an image dataset into Parquet or WebDataset token shards with VFMTok, on Ray.

Runs on an embedded local Ray by default, or on the cluster named by RAY_ADDRESS (as under
``ray job submit --working-dir . -- python -m jobs.tokenize ...``). Rerunning the same command
after a crash finishes what is left; bad inputs are recorded under ``rejects/``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

from jobs.cli import UsageError, fail, parse_config, require_files, setup_logging, storage_options
from pipelines.producer.images import DEFAULT_MAX_PIXELS, VARIANT_SETS
from pipelines.producer.precision import PRECISIONS
from pipelines.contract.manifest import IncompatibleOutput
from pipelines.ray_runtime import ray_session
from pipelines.contract.shards import SHARD_FORMATS
from pipelines.producer.ray_tokenize import CHUNK_BYTES, JobStopped
from pipelines.producer.sources import FORMATS, Columns, InputError, detect_format
from pipelines.producer.tokenize import TokenizeOptions, TokenizerSpec, dry_run, run_tokenize
from vfmtok_core import CONFIGS

log = logging.getLogger("jobs.tokenize")


@dataclass
class TokenizeConfig:
    """Tokenize an image dataset (folder, WebDataset, Parquet or LMDB; local or S3) into token shards."""

    input: str = field(default="", metadata={"help": "input dataset URL (required)"})
    output: str = field(default="", metadata={"help": "output dataset URL (required)"})
    format: str = field(default="parquet", metadata={"help": "shard format", "choices": list(SHARD_FORMATS)})
    input_format: str | None = field(default=None, metadata={"help": "input layout (default: detected)", "choices": list(FORMATS)})
    variants: str = field(default="center", metadata={"help": f"comma-separated, from {', '.join(VARIANT_SETS)}"})
    config: str = field(default="tiny", metadata={"help": "tokenizer config", "choices": sorted(CONFIGS)})
    tokenizer: str | None = field(default=None, metadata={"help": "vfmtok-tokenizer.pt (path or URL)"})
    dinov2: str | None = field(default=None, metadata={"help": "dinov2_vitl14_reg4_pretrain.pth (path or URL)"})
    seed: int = field(default=0, metadata={"help": "random-weight seed when no --tokenizer is given"})
    batch_size: int = field(default=64, metadata={"help": "images per tokenizer forward"})
    workers: int = field(default=0, metadata={"help": "tokenizer actors (0: one per GPU, or 1 without GPUs)"})
    gpus_per_worker: float = field(default=-1.0, metadata={"help": "GPUs per actor (-1: 1 if the cluster has GPUs)"})
    threads: int = field(default=0, metadata={"help": "torch threads per actor (0: cores / workers)"})
    rows_per_shard: int = field(default=1024, metadata={"help": "images per shard for folder/LMDB inputs"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject larger images (bomb guard)"})
    precision: str = field(default="auto", metadata={"help": "tokenizer precision (auto: bf16 on CUDA, fp32 on CPU; tf32: fp32 with TF32 matmuls and convolutions on CUDA)", "choices": list(PRECISIONS)})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options as JSON, or @FILE holding JSON (keeps keys off the command line)"})
    overwrite: bool = field(default=False, metadata={"help": "delete the existing output if it was written with other settings (tokenizer, variants, format, ...); one written with these is resumed"})
    image_column: str | None = field(default=None, metadata={"help": "Parquet input: the image column (default: found by name)"})
    label_column: str | None = field(default=None, metadata={"help": "Parquet input: the label column (default: found by name)"})
    key_column: str | None = field(default=None, metadata={"help": "Parquet input: the key column (default: found by name)"})
    max_bytes_in_flight: int = field(default=4 << 30, metadata={"help": "input bytes of the work items in flight at once"})
    max_store_bytes: int = field(default=0, metadata={"help": "crop bytes waiting for tokenizers in Ray's object store (0: half the cluster's object store)"})
    chunk_bytes: int = field(default=CHUNK_BYTES, metadata={"help": "decoded crop bytes per tokenizer call (a work item is sent in chunks of this size)"})
    dry_run: bool = field(default=False, metadata={"help": "plan, print what a run would do (and skip), and exit; starts nothing"})
    extend: bool = field(default=False, metadata={"help": "list the input again and add what appeared since the stored plan as new work items (vanished or changed inputs are reported)"})


def to_options(cfg: TokenizeConfig, cluster_gpus: float, input_format: str, storage: dict) -> TokenizeOptions:
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker >= 0 else (1.0 if cluster_gpus else 0.0)
    workers = cfg.workers or (max(1, int(cluster_gpus / gpus)) if gpus else 1)
    spec = TokenizerSpec(cfg.config, cfg.tokenizer, cfg.dinov2, cfg.seed, cfg.precision, storage)
    return TokenizeOptions(
        input=cfg.input, output=cfg.output, format=cfg.format,
        input_format=input_format,
        variants=tuple(v.strip() for v in cfg.variants.split(",") if v.strip()), spec=spec,
        batch_size=cfg.batch_size, workers=workers, gpus_per_worker=gpus, threads=cfg.threads,
        rows_per_shard=cfg.rows_per_shard, max_pixels=cfg.max_pixels, storage_options=storage,
        overwrite=cfg.overwrite, columns=Columns(cfg.image_column, cfg.label_column, cfg.key_column),
        max_bytes_in_flight=cfg.max_bytes_in_flight, max_store_bytes=cfg.max_store_bytes, chunk_bytes=cfg.chunk_bytes,
        extend=cfg.extend,
    )


def check(cfg: TokenizeConfig) -> tuple[str, dict]:
    """Find the user mistakes that show before Ray starts (seconds, and log lines, saved): missing
    flags, bad storage options, an input that is not there. Returns the input's format and the
    parsed storage options."""
    if not cfg.input or not cfg.output:
        raise UsageError("--input and --output are required")
    storage = storage_options(cfg.storage_options)
    require_files(storage, ("--tokenizer", cfg.tokenizer), ("--dinov2", cfg.dinov2))
    return cfg.input_format or detect_format(cfg.input, storage), storage


def run(cfg: TokenizeConfig) -> dict:
    input_format, storage = check(cfg)
    if cfg.dry_run:
        return dry_run(to_options(cfg, 0.0, input_format, storage))
    if not cfg.tokenizer:
        log.warning(
            "RANDOM WEIGHTS: no --tokenizer was given, so config %r runs with seed-%d random weights. "
            "These tokens are for trying the pipeline only; pass --tokenizer (and --dinov2) for real ones.",
            cfg.config, cfg.seed,
        )
    with ray_session() as ray:
        opts = to_options(cfg, ray.cluster_resources().get("GPU", 0.0), input_format, storage)
        summary = run_tokenize(opts)
    summary["random_weights"] = not cfg.tokenizer
    this = summary["this_run"]
    log.info(
        "%d images x %d variants in %d shards (%.1f MB); %d rejected %s; this run: %d images in %.1fs (%.1f images/s)",
        summary["images"], len(summary["variants"]), summary["shards"], summary["bytes"] / 1e6, summary["rejects"],
        summary["rejects_by_reason"] or "", this["images"], this["seconds"], this["images_per_s"],
    )
    if this["failed_items"]:
        log.error("%d work items failed; rerun the same command to retry them", len(this["failed_items"]))
    return summary


def main(argv=None) -> None:
    setup_logging()
    try:
        summary = run(parse_config(TokenizeConfig, argv, description=__doc__))
    except (IncompatibleOutput, InputError, UsageError, JobStopped) as e:
        fail(e)
    print(json.dumps(summary, indent=1))
    sys.exit(0 if summary.get("complete", True) else 1)  # a dry run has nothing to complete


if __name__ == "__main__":
    main()
