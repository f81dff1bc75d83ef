"""Train a class-conditional GPT on token shards, streamed; no image is ever re-encoded.

Runs as a single process (the embedded default), under ``torchrun`` (DDP, or FSDP with ``--fsdp``)
or on Ray Train with ``--ray-workers N`` (e.g. under ``ray job submit``). Checkpoints (model, EMA,
optimiser, data position, step) are written atomically to ``--out`` (local or S3); ``--resume``
continues from the newest one with the same samples and the same dropout draws an uninterrupted
run would have used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from jobs.cli import UsageError, require_files, storage_options
from jobs.distributed import mean_across, run_on_ray_train, setup_distributed, trainer_main
from pipelines.consumer.checkpoints import latest_step
from pipelines.consumer.run_checkpoints import RunCheckpoints
from pipelines.contract.redact import redact, redact_url
from pipelines.contract.storage import filesystem, is_local, join
from pipelines.consumer.streaming import DatasetIncomplete, DatasetMismatch, ShardError, TokenDataset, TokenLoader
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.gpt import GPT, GPT_CONFIGS
from vfmtok_core.training import EMA, Throughput, adamw, peak_tflops

log = logging.getLogger("jobs.train_gpt")


@dataclass
class TrainConfig:
    """Train a class-conditional GPT (LlamaGen/VFMTok recipe) on streamed token shards."""

    data: str = field(default="", metadata={"help": "token dataset URL (folder with manifest.json; required)"})
    out: str = field(default="out/train", metadata={"help": "checkpoint folder (local or fsspec URL)"})
    size: str = field(default="GPT-tiny", metadata={"help": "GPT size", "choices": sorted(GPT_CONFIGS)})
    epochs: int = field(default=300, metadata={"help": "epochs (upstream: 300 for B/L, 200 above)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in all (0: all epochs)"})
    global_batch: int = field(default=512, metadata={"help": "samples per optimiser step over all ranks"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant, as upstream)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.05, metadata={"help": "on matrices and embeddings only"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    ema: float = field(default=0.9999, metadata={"help": "EMA decay"})
    class_dropout: float = field(default=0.1, metadata={"help": "probability of the null class in training"})
    dropout: float = field(default=0.1, metadata={"help": "token, residual and FFN dropout"})
    precision: str = field(default="bf16", metadata={"help": "autocast precision", "choices": ["bf16", "fp32"]})
    seed: int = field(default=0, metadata={"help": "model init, data order and dropout seed"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers per rank (0: load in-process; shards are still fetched ahead by a thread)"})
    ckpt_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (and at the end)"})
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    fsdp: bool = field(default=False, metadata={"help": "shard parameters with FSDP instead of DDP (within each node when the run spans several: HSDP)"})
    shard_ranks: int = field(default=0, metadata={"help": "with --fsdp: ranks sharing one copy of the model (0: a node's ranks, LOCAL_WORLD_SIZE); fewer than the world size replicates across groups (HSDP)"})
    ray_workers: int = field(default=0, metadata={"help": "run on Ray Train with this many workers"})
    skip_bad_shards: bool = field(default=False, metadata={"help": "log and skip unreadable shards"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step on each rank (the global batch is kept; data order and loss do not depend on it)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in the backward pass (less memory, about a third more compute; for GPT-XL and larger)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each transformer block (regional compilation)"})
    peak_tflops: float = field(default=0.0, metadata={"help": "the device's peak dense TFLOP/s for MFU (0: known GPUs by name; none on a CPU)"})
    checkpoint_format: str = field(default="sharded", metadata={"help": "sharded: each rank writes its shards (torch.distributed.checkpoint; export with jobs.export_gpt); full: one file gathered on rank 0", "choices": ["sharded", "full"]})
    async_checkpoint: bool = field(default=True, metadata={"help": "write sharded checkpoints in the background while training goes on"})
    init: str | None = field(default=None, metadata={"help": "start from these GPT weights (a released GPT-*.pt or an export) instead of a random init"})
    follow: bool = field(default=False, metadata={"help": "train on a dataset its tokenization job is still writing: each epoch takes the shards committed when it begins"})
    follow_patience: float = field(default=3600.0, metadata={"help": "with --follow: seconds without a new commit (and too few samples to start an epoch) after which the trainer stops, since the job writing the dataset has most likely died"})
    order: str = field(default="auto", metadata={"help": "sample order: a global permutation, shard windows, or auto (global when the set fits --cache-bytes)", "choices": ["auto", "global", "window"]})
    cache_dir: str | None = field(default=None, metadata={"help": "root of the node's shard cache (default: $VFMTOK_CACHE_DIR or the temp folder)"})
    cache_bytes: int = field(default=16 << 30, metadata={"help": "most bytes of decoded shards the node's cache holds"})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options for --data and --out: JSON, or @FILE holding JSON"})
    metrics: str | None = field(default=None, metadata={"help": "JSONL metrics file (default: <out>/metrics.jsonl if local)"})


def _shard_group(cfg: TrainConfig, world: int) -> int:
    """Ranks that shard one copy of the model: ``--shard-ranks``, else a node's ranks."""
    size = cfg.shard_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise UsageError(f"--shard-ranks {size} must divide the world size {world}")
    return size


def _wrap(model: torch.nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP per block: within a node when the run spans several (HSDP: parameters sharded
    over the node's fast links, replicated across nodes, whose gradients are all-reduced), or over
    every rank."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shard = _shard_group(cfg, world)
        mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
        if world // shard == 1:
            mesh = mesh["shard"]  # one copy: plain FSDP
        if dist.get_rank() == 0:
            log.info("FSDP: %d replica(s) of the model, each sharded over %d ranks", world // shard, shard)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _initialise(model: GPT, path: str, size: str, so: dict) -> None:
    """Start from released or exported weights (``GPT-*.pt``: ``ema`` or ``model``) instead of a
    random initialisation; the file's vocabulary and classes must be the dataset's."""
    start = GPT.from_pretrained(path, size=size, storage_options=so)
    if (start.config.vocab_size, start.config.num_classes) != (model.config.vocab_size, model.config.num_classes):
        raise UsageError(f"--init {redact_url(path)} has a vocabulary of {start.config.vocab_size} and "
                         f"{start.config.num_classes} classes; the data needs {model.config.vocab_size} and "
                         f"{model.config.num_classes}")
    model.load_state_dict(start.state_dict())
    log.info("initialised from %s", redact_url(path))


def _gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """Reduce gradients across ranks only on a step's last micro-batch (DDP's ``no_sync``, FSDP's
    ``set_requires_gradient_sync``); the others accumulate locally."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def paused():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def _any_rank_out(out: bool, world: int) -> bool:
    """True on every rank when any rank has no batch left (so that no rank waits for the others)."""
    if world == 1:
        return out
    flag = torch.tensor([float(out)], device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _distinct_batches(keys: list[str], world: int) -> int:
    """How many ranks' batches of this step differ (``world`` when every rank read its own samples)."""
    digest = hashlib.sha256("\0".join(keys).encode()).hexdigest()
    if world == 1:
        return 1
    gathered: list = [None] * world
    dist.all_gather_object(gathered, digest)
    return len(set(gathered))


def _check_labels(batch: dict, num_classes: int) -> None:
    """Every sample needs a class in [0, num_classes): an input without class folders or labels
    tokenizes to label -1, which would otherwise fail deep inside the class embedding."""
    bad = (batch["label"] < 0) | (batch["label"] >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise UsageError(f"sample {batch['key'][i]!r} has label {int(batch['label'][i])}: class-conditional training "
                         f"needs a label in [0, {num_classes}) for every sample (tokenize an input with labels)")


def train(cfg: TrainConfig) -> dict:
    """The training loop (one call per rank); returns the last metrics on every rank."""
    if not cfg.data:
        raise UsageError("--data is required")
    rank, world, device = setup_distributed()
    so = storage_options(cfg.storage_options)
    require_files(so, ("--init", cfg.init))
    if cfg.global_batch % world:
        raise UsageError(f"--global-batch {cfg.global_batch} is not divisible by the world size {world}")
    per_rank = cfg.global_batch // world
    if cfg.grad_accum < 1 or per_rank % cfg.grad_accum:
        raise UsageError(f"--grad-accum {cfg.grad_accum} must divide the per-rank batch {per_rank} (--global-batch / world size)")
    micro = per_rank // cfg.grad_accum
    checkpoints = RunCheckpoints(cfg.out, so, cfg.checkpoint_format, rank, world, cfg.async_checkpoint)
    ckpt = checkpoints.train_state()
    if ckpt is not None and not cfg.resume:
        raise UsageError(f"{redact_url(cfg.out)} already holds checkpoints; pass --resume to continue, or use another --out")
    if ckpt is not None and ckpt["size"] != cfg.size:
        raise UsageError(f"the checkpoint in {redact_url(cfg.out)} is {ckpt['size']}, not {cfg.size}")

    ds = TokenDataset(
        cfg.data, seed=cfg.seed, rank=rank, world_size=world, storage_options=so, batch_size=per_rank,
        expected_fingerprint=ckpt["fingerprint"] if ckpt else None, skip_bad_shards=cfg.skip_bad_shards,
        follow=cfg.follow, follow_patience_seconds=cfg.follow_patience, min_samples=cfg.global_batch, order=cfg.order, cache_dir=cfg.cache_dir,
        cache_bytes=cfg.cache_bytes,
    )
    if len(ds) < cfg.global_batch:
        raise UsageError(f"{redact_url(cfg.data)} has {len(ds)} samples, fewer than one global batch of {cfg.global_batch}")

    model = GPT.from_config(
        cfg.size, seed=cfg.seed, vocab_size=ds.manifest["codebook_size"], block_size=ds.tokens_per_image,
        class_dropout=cfg.class_dropout, token_dropout=cfg.dropout, resid_dropout=cfg.dropout, ffn_dropout=cfg.dropout,
    ).to(device)
    if cfg.init and ckpt is None:
        _initialise(model, cfg.init, cfg.size, so)
    model.train()
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        for block in model.layers:  # per block: compiles once for all blocks, and FSDP wraps blocks
            block.compile()
    wrapped = _wrap(model, cfg, world, device)
    meter = Throughput(model, cfg.peak_tflops or peak_tflops(device), world)
    ema = EMA(model, cfg.ema)
    opt = adamw(wrapped, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    step = 0
    if ckpt is not None:
        checkpoints.restore(wrapped, opt, ema)
        ds.load_state_dict(ckpt["data"])
        step = ckpt["step"]
        if rank == 0:
            log.info("resumed from step %d (epoch %d, %d samples into it)", step, ds.epoch, ds.consumed)
    loader = TokenLoader(ds, micro, num_workers=cfg.num_workers)

    out_fs, out_root = filesystem(cfg.out, so)
    metrics_path = cfg.metrics or (join(out_root, "metrics.jsonl") if is_local(out_fs) else None)
    if rank == 0 and metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    # An epoch's length is fixed when it begins (in follow mode it grows from epoch to epoch).
    bar = tqdm(total=cfg.max_steps or None, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    last: dict = {}
    saved: dict = {}  # the newest checkpoint's seconds and bytes, reported with the next metrics
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def finished() -> bool:
        return ds.epoch >= cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)

    while not finished():
        epoch, steps_in_epoch = ds.epoch, len(ds) // cfg.global_batch
        batches = iter(loader)
        while ds.consumed // cfg.global_batch < steps_in_epoch and not finished():
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for i in range(cfg.grad_accum):
                with meter.waiting():
                    batch = next(batches, None)
                # Only skipped shards can leave a rank short of its epoch's batches; the check is a
                # collective (a device sync on NCCL), so it runs only when shards may be skipped.
                if _any_rank_out(batch is None, world if cfg.skip_bad_shards else 1):
                    break
                # Dropout and class dropout draw from a stream fixed by (seed, micro-batch, rank): resumes repeat them.
                torch.manual_seed(cfg.seed * 1_000_003 + (step * cfg.grad_accum + i) * world + rank)
                _check_labels(batch, model.config.num_classes)
                labels, tokens = batch["label"].to(device), batch["tokens"].to(device)
                with _gradient_sync(wrapped, i == cfg.grad_accum - 1), autocast:
                    logits = wrapped(labels, tokens)
                    # The mean over the global batch: each micro-batch holds 1/grad_accum of a rank's samples.
                    micro_loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) / cfg.grad_accum
                micro_loss.backward()
                loss += micro_loss.detach()
                meter.count(labels.shape[0], tokens.shape[1])
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                opt.step()
                ema.update(model)
                step += 1
            if batch is None:
                log.warning("epoch %d ended early: skipped shards left too few samples for its %d steps", epoch, steps_in_epoch)
                ds.consumed = len(ds)
                break
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = {
                    "step": step, "epoch": epoch, "loss": float(mean_across(loss, world)), "grad_norm": float(grad_norm),
                    "lr": cfg.lr, **meter.report(device), "world_size": world,
                    "distinct_rank_batches": _distinct_batches(batch["key"], world),
                    "epoch_samples": len(ds), "skipped_shards": len(ds.skipped_shards),
                    "node_cache_bytes": ds.cache.held_bytes(), **saved,
                }
                if rank == 0:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                    **({"mfu": f"{last['mfu']:.1%}"} if last.get("mfu") is not None else {}))
                    log.info("step %d epoch %d loss %.6f grad_norm %.4f", step, epoch, last["loss"], last["grad_norm"])
                    if metrics_path:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(last) + "\n")
            end_of_epoch = ds.consumed // cfg.global_batch >= steps_in_epoch
            if step % cfg.ckpt_every == 0 or end_of_epoch and ds.epoch + 1 >= cfg.epochs or step == cfg.max_steps:
                saved = checkpoints.save(step, wrapped, opt, ema, ds, {
                    "size": cfg.size, "vocab_size": model.config.vocab_size, "block_size": model.config.block_size,
                    # The run's settings, to tell runs apart later; never its credentials.
                    "config": {**asdict(cfg), "storage_options": redact(so)},
                })
            checkpoints.poll()
            bar.update(1)
        if ds.consumed // cfg.global_batch >= steps_in_epoch:
            ds.set_epoch(epoch + 1)
    bar.close()
    checkpoints.close()
    if rank == 0 and not last:
        log.info("nothing to do: %s is already at step %d (epoch %d)", redact_url(cfg.out), step, ds.epoch)
    if world > 1:
        dist.barrier()
    return last


def run_on_ray(cfg: TrainConfig) -> dict:
    """Run :func:`train` on ``cfg.ray_workers`` Ray Train workers; returns the newest checkpoint's
    ``{"step", "path"}``."""
    run_on_ray_train(lambda: train(cfg), cfg.ray_workers)
    return latest_step(cfg.out, storage_options(cfg.storage_options))


def main(argv=None) -> None:
    trainer_main(TrainConfig, train, run_on_ray, (UsageError, DatasetMismatch, DatasetIncomplete, ShardError, CheckpointError, FileNotFoundError), argv, __doc__)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # defined in __main__ by value, with everything they reference, and some of that does not pickle.
    from jobs.train_gpt import main as importable_main

    importable_main()
