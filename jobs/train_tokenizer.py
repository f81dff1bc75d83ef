"""Train (or fine-tune) a VFMTok tokenizer with the official objective on any image source.

Reads folder, WebDataset, Parquet or LMDB inputs, local or S3, with the upstream augmentation (ADM
random crop, flip) in an order fixed by (seed, epoch). The loss is upstream's (see
:mod:`vfmtok_core.tokenizer_loss`): 2 x MSE, LPIPS-VGG16, the DINO-S/16 discriminator (hinge; the
non-saturating generator loss from ``--disc-start``), codebook + 0.25 commitment and the semantic
branch's 1 - cos against DINOv2. Adam (0.9, 0.95) with a linear warmup, EMA, bf16 autocast,
gradient clipping; DINOv2 stays frozen and outside the optimiser.

Runs as one process, under ``torchrun`` (DDP) or on Ray Train (``--ray-workers N``). Checkpoints use
the released layout (``model``, ``ema``, ``optimizer``, ``discriminator``, ``optimizer_disc``,
``steps``, ``args``), so ``VFMTokenizer.from_pretrained`` and ``jobs.tokenize --tokenizer`` take them
as they take ``vfmtok-tokenizer.pt``; ``--resume`` continues exactly where the newest one stopped.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs.cli import UsageError, require_files, storage_options
from jobs.distributed import from_rank0, mean_across, merged_on_rank0, run_on_ray_train, setup_distributed, trainer_main
from pipelines.consumer.checkpoints import latest_step, load_latest, save_checkpoint
from pipelines.producer.training_images import ImageIndex, NoUsableImages, TrainingImages, count_samples, image_loader, plan_input
from pipelines.consumer.recon_grid import save_grid
from pipelines.contract.redact import redact, redact_url
from pipelines.contract.storage import atomic_write, exists, filesystem, is_local, join, read_bytes
from pipelines.producer.sources import FORMATS, Columns, InputError
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.config import CONFIGS, get_config
from vfmtok_core.discriminator import DinoDiscriminator
from vfmtok_core.lpips import LPIPS, LPIPS_WIDTHS
from vfmtok_core.tokenizer import VFMTokenizer
from vfmtok_core.tokenizer_loss import RECONSTRUCTION, LossConfig, TokenizerLoss
from vfmtok_core.training import EMA, peak_memory_gb, warmup_cosine_lr

log = logging.getLogger("jobs.train_tokenizer")

INDEX_FILE = "train-index.parquet"  # the input's plan and sample counts, fixed at the run's start
DINOV2_FILE = "dinov2.pth"  # the frozen backbone, written when it was not loaded from a file


@dataclass
class TrainTokenizerConfig:
    """Train a VFMTok tokenizer (the official objective) on streamed images."""

    data: str = field(default="", metadata={"help": "training images: a folder, WebDataset tars, Parquet or an LMDB (local or URL; required)"})
    out: str = field(default="out/train-tokenizer", metadata={"help": "checkpoint folder (local or fsspec URL)"})
    config: str = field(default="tiny", metadata={"help": "tokenizer config", "choices": sorted(CONFIGS)})
    input_format: str | None = field(default=None, metadata={"help": "input layout (default: detected)", "choices": list(FORMATS)})
    image_column: str | None = field(default=None, metadata={"help": "Parquet image column (default: found by name)"})
    dinov2: str | None = field(default=None, metadata={"help": "frozen backbone dinov2_vit*14_reg4_pretrain.pth (path or URL; default: seeded random weights, written to <out>/dinov2.pth)"})
    init: str | None = field(default=None, metadata={"help": "fine-tune from this tokenizer (vfmtok-tokenizer.pt or one of ours: its ema weights)"})
    lpips_vgg16: str | None = field(default=None, metadata={"help": "torchvision vgg16-397923af.pth for LPIPS (default: random weights)"})
    lpips_heads: str | None = field(default=None, metadata={"help": "LPIPS linear heads vgg.pth (default: random weights)"})
    disc_dino: str | None = field(default=None, metadata={"help": "discriminator backbone dino_deitsmall16_pretrain.pth (default: random weights)"})
    loss_networks: str = field(default="auto", metadata={"help": "size of LPIPS and the discriminator: full (VGG16, DINO-S/16), tiny (for tests and demos), auto (tiny with --config tiny)", "choices": ["auto", "full", "tiny"]})
    epochs: int = field(default=50, metadata={"help": "epochs (upstream: 50)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in all (0: all epochs)"})
    global_batch: int = field(default=16, metadata={"help": "images per optimiser step over all ranks (upstream: 16)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate, tokenizer and discriminator"})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    warmup_epochs: float = field(default=4.0, metadata={"help": "linear warmup of the tokenizer's lr from 1e-7 (upstream: 4 epochs; constant after)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm, both optimisers"})
    ema: float = field(default=0.9999, metadata={"help": "EMA decay"})
    reconstruction: str = field(default="l2", metadata={"help": "l2: 2 x MSE (upstream); l1: L1 + MSE", "choices": list(RECONSTRUCTION)})
    reconstruction_weight: float = field(default=1.0, metadata={"help": "weight of the pixel loss"})
    perceptual_weight: float = field(default=1.0, metadata={"help": "weight of LPIPS"})
    disc_weight: float = field(default=0.5, metadata={"help": "weight of both GAN terms once they start"})
    disc_start: int = field(default=20000, metadata={"help": "step at which the GAN terms start"})
    dropout: float | None = field(default=None, metadata={"help": "decoder attention dropout (default: the config's, 0.1)"})
    precision: str = field(default="bf16", metadata={"help": "autocast precision", "choices": ["bf16", "fp32"]})
    seed: int = field(default=0, metadata={"help": "init, data order, augmentation and dropout seed"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader processes decoding and augmenting images, per rank"})
    order: str = field(default="auto", metadata={"help": "global permutation, or windows of work items (auto: global for folders and LMDB, windows for tars and Parquet)", "choices": ["auto", "global", "window"]})
    window_items: int = field(default=8, metadata={"help": "work items per shuffle window (each rank keeps one window of tar or Parquet items in memory)"})
    ckpt_every: int = field(default=5000, metadata={"help": "checkpoint every N steps (and at the end)"})
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    image_every: int = field(default=1000, metadata={"help": "write a reconstruction grid PNG every N steps (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    ray_workers: int = field(default=0, metadata={"help": "run on Ray Train with this many workers"})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options for every URL: JSON, or @FILE holding JSON"})
    metrics: str | None = field(default=None, metadata={"help": "JSONL metrics file (default: <out>/metrics.jsonl if local)"})


def _index(cfg: TrainTokenizerConfig, so: dict, rank: int, world: int) -> ImageIndex:
    """The run's input index: built on the first start and stored in ``--out``; every later start
    reads the stored one, so the samples never change mid-run."""
    fs, root = filesystem(cfg.out, so)
    path = join(root, INDEX_FILE)
    # Rank 0's answer for all: ranks that saw the store differently would wait on different collectives.
    if not from_rank0(exists(fs, path) if rank == 0 else None, world):
        index = _build_index(cfg, so, rank, world)
        if rank == 0:
            atomic_write(fs, path, index.to_bytes())
            log.info("indexed %s: %d %s items, %d samples", redact_url(cfg.data), len(index.counts), index.fmt, len(index))
        if world > 1:
            dist.barrier()
    index = ImageIndex.from_bytes(read_bytes(fs, path))
    if index.url != cfg.data:
        raise UsageError(f"{redact_url(cfg.out)} was started on {redact_url(index.url)}, not {redact_url(cfg.data)}; use another --out")
    return index


def _build_index(cfg: TrainTokenizerConfig, so: dict, rank: int, world: int) -> ImageIndex | None:
    """Rank 0 lists the input; every rank counts the samples of its share of the files (a
    WebDataset is read whole to count them), so the others wait at the collectives for the
    listing plus 1/world of the reading, not for all of it. The index on rank 0, None elsewhere."""
    listed = plan_input(cfg.data, so, cfg.input_format, Columns(image=cfg.image_column)) if rank == 0 else None
    planned, fmt = from_rank0(listed, world)
    counts = merged_on_rank0(count_samples(planned, fmt, so, rank, world, progress=rank == 0), world)
    return ImageIndex.from_counts(planned, fmt, cfg.data, counts) if rank == 0 else None


def _loss_networks(cfg: TrainTokenizerConfig, so: dict) -> tuple[LPIPS, DinoDiscriminator, bool]:
    """LPIPS and the discriminator, from the given files; (..., whether any weights are random)."""
    size = cfg.loss_networks if cfg.loss_networks != "auto" else ("tiny" if cfg.config == "tiny" else "full")
    widths = LPIPS_WIDTHS[size]
    disc_config = "tiny" if size == "tiny" else "dino-s16"
    if cfg.lpips_vgg16 and cfg.lpips_heads:
        perceptual = LPIPS.from_files(cfg.lpips_vgg16, cfg.lpips_heads, so, widths=widths)
    else:
        perceptual = LPIPS(widths=widths)
    disc = DinoDiscriminator.from_files(cfg.disc_dino, disc_config, so) if cfg.disc_dino else DinoDiscriminator(disc_config)
    return perceptual, disc, not (cfg.lpips_vgg16 and cfg.disc_dino)


def _tokenizer(cfg: TrainTokenizerConfig, so: dict) -> VFMTokenizer:
    """The model to train: seeded random (the backbone from ``--dinov2`` when given), or ``--init``."""
    config = get_config(cfg.config)
    if cfg.dropout is not None:
        config = replace(config, decoder=replace(config.decoder, attn_dropout=cfg.dropout))
    model = VFMTokenizer.from_config(config, seed=cfg.seed, precision=cfg.precision)
    if cfg.dinov2:
        model.load_dinov2(cfg.dinov2, so)
    if cfg.init:
        # Its backbone is --dinov2's (the file holds none); every other weight is checked on loading.
        start = VFMTokenizer.from_pretrained(cfg.init, config=config, storage_options=so, decoder_only=True)
        model.load_state_dict(start.state_dict(), strict=False)
        log.info("initialised from %s", redact_url(cfg.init))
    return model


def _trained_state(model: VFMTokenizer) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model`` entry: everything but the frozen backbone, as upstream saves it."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("dinov2.")}


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def _average_gradients(module: torch.nn.Module, world: int) -> None:
    """All-reduce the discriminator's gradients by hand: it is called several times per step (real,
    fake, and through the generator's loss), which DDP's one-forward-one-backward reducer refuses."""
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _codebook_usage(model: VFMTokenizer) -> float:
    """Distinct codes among the quantiser's recent window, over the codebook size (upstream's statistic)."""
    used = model.slot_quantize.codebook_used
    return float(torch.unique(used).numel()) / model.config.quantizer.codebook_size


@dataclass
class _Run:
    """The trained pieces of a run and one optimisation step over them."""

    model: VFMTokenizer
    wrapped: torch.nn.Module  # the model, under DDP when the run has several ranks
    criterion: TokenizerLoss
    opt: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    ema: EMA
    world: int

    @property
    def disc(self) -> torch.nn.Module:
        return self.criterion.discriminator

    def step(self, x: torch.Tensor, step: int, lr: float, cfg: TrainTokenizerConfig):
        """The tokenizer's step, then the discriminator's on the same reconstructions; returns
        (reconstructions, every term, the two gradient norms)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        with autocast:
            out = self.wrapped(x)
            loss, terms = self.criterion.generator(x, out, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.model)

        self.opt_disc.zero_grad(set_to_none=True)  # also drops what the generator's loss left on it
        with autocast:
            d_loss, d_terms = self.criterion.discriminator_step(x, out.reconstruction, step)
        d_loss.backward()
        _average_gradients(self.disc, self.world)
        disc_norm = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
        self.opt_disc.step()
        recon = out.reconstruction.detach()
        mse = torch.mean((recon.float().clamp(-1, 1) - x) ** 2)
        terms = {**terms, **d_terms, "psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-10))}
        return recon, terms, {"grad_norm": float(grad_norm), "disc_grad_norm": float(disc_norm)}

    def state(self, step: int, epoch: int, consumed: int, args: dict) -> dict:
        """A checkpoint in the released layout (plus the data position and the config)."""
        trained = _trained_state(self.model)
        return {
            "model": trained,
            "ema": {**trained, **self.ema.state_dict()},  # upstream's EMA copy: averaged parameters, buffers as trained
            "optimizer": self.opt.state_dict(), "discriminator": self.disc.state_dict(),
            "optimizer_disc": self.opt_disc.state_dict(), "steps": step,
            "data": {"epoch": epoch, "consumed": consumed}, "config": self.model.config.to_dict(), "args": args,
        }

    def restore(self, state: dict) -> tuple[int, int, int]:
        """Load a checkpoint's states; returns (step, epoch, samples consumed in it)."""
        self.model.load_state_dict(state["model"], strict=False)  # the frozen backbone is not in it
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_disc.load_state_dict(state["optimizer_disc"])
        return state["steps"], state["data"]["epoch"], state["data"]["consumed"]


def _build(cfg: TrainTokenizerConfig, so: dict, rank: int, world: int, device: torch.device) -> _Run:
    model = _tokenizer(cfg, so).to(device)
    torch.manual_seed(cfg.seed)  # random loss networks (and the discriminator's heads) equal on every rank
    perceptual, disc, random_loss = _loss_networks(cfg, so)
    if random_loss and rank == 0:
        log.warning("RANDOM WEIGHTS in the loss networks: pass --lpips-vgg16, --lpips-heads and --disc-dino for real training")
    criterion = TokenizerLoss(LossConfig(cfg.reconstruction, cfg.reconstruction_weight, cfg.perceptual_weight,
                                         cfg.disc_weight, cfg.disc_start), perceptual, disc).to(device)
    model.train()
    disc.train()
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers stay per rank: the only one is the quantiser's usage window, a statistic.
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    betas = (cfg.beta1, cfg.beta2)
    # DINOv2 is frozen and never in the optimiser; Adam without weight decay, as upstream.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=betas)
    opt_disc = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=cfg.lr, betas=betas)
    return _Run(model, wrapped, criterion, opt, opt_disc, EMA(model, cfg.ema), world)


def _check_flags(cfg: TrainTokenizerConfig) -> None:
    if not cfg.data:
        raise UsageError("--data is required")
    if cfg.init and not cfg.dinov2:
        raise UsageError("--init needs --dinov2: a tokenizer is fine-tuned against the backbone it was trained with")
    if bool(cfg.lpips_vgg16) != bool(cfg.lpips_heads):
        raise UsageError("--lpips-vgg16 and --lpips-heads go together")


def train(cfg: TrainTokenizerConfig) -> dict:
    """The training loop (one call per rank); returns the last metrics on every rank."""
    _check_flags(cfg)
    rank, world, device = setup_distributed()
    so = storage_options(cfg.storage_options)
    require_files(so, *((f"--{f.replace('_', '-')}", getattr(cfg, f)) for f in ("dinov2", "init", "lpips_vgg16", "lpips_heads", "disc_dino")))
    if cfg.global_batch % world:
        raise UsageError(f"--global-batch {cfg.global_batch} is not divisible by the world size {world}")
    latest = latest_step(cfg.out, so)
    if latest is not None and not cfg.resume:
        raise UsageError(f"{redact_url(cfg.out)} already holds checkpoints; pass --resume to continue, or use another --out")
    index = _index(cfg, so, rank, world)
    images = TrainingImages(index, get_config(cfg.config).image_size, cfg.global_batch // world, cfg.seed, rank, world, so,
                            cfg.order, cfg.window_items)
    steps_per_epoch = len(images) // cfg.global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{redact_url(cfg.data)} has {len(images)} samples, fewer than one global batch of {cfg.global_batch}")

    run = _build(cfg, so, rank, world, device)
    out_fs, out_root = filesystem(cfg.out, so)
    step, epoch, consumed = 0, 0, 0
    if latest is not None:
        step, epoch, consumed = run.restore(load_latest(cfg.out, so))
        if rank == 0:
            log.info("resumed from step %d (epoch %d, %d samples into it)", step, epoch, consumed)
    elif rank == 0 and not cfg.dinov2:
        # A seeded random backbone is part of the model: keep it so the result can be loaded.
        atomic_write(out_fs, join(out_root, DINOV2_FILE), _state_bytes(run.model.dinov2.state_dict()))
    args = {**asdict(cfg), "storage_options": redact(so)}  # to tell runs apart later; never credentials

    metrics_path = cfg.metrics or (join(out_root, "metrics.jsonl") if is_local(out_fs) else None)
    if rank == 0 and metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduled = cfg.epochs * steps_per_epoch  # the schedule's length does not depend on --max-steps
    total = cfg.max_steps or scheduled
    bar = tqdm(total=total, initial=step, desc="train tokenizer", unit="step", disable=rank != 0, dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}  # of the steps since the last log line (a resume starts a fresh interval)
    counted = 0
    rejected = 0
    last: dict = {}
    interval_start, waited = time.perf_counter(), 0.0

    def finished() -> bool:
        return epoch >= cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)

    while not finished():
        images.epoch, images.consumed = epoch, consumed
        batches = iter(image_loader(images, cfg.num_workers))
        while not finished() and consumed // cfg.global_batch < steps_per_epoch:
            wait_start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_start
            for key, reason, message in batch["rejected"]:
                log.warning("rejected %s (%s): %s", key, reason, message)
            rejected += len(batch["rejected"])
            x = batch["image"].to(device, non_blocking=True)
            # Dropout and the discriminator's crops draw from a stream fixed by (seed, step, rank).
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            lr = warmup_cosine_lr(step, cfg.lr, warmup, scheduled)
            recon, terms, norms = run.step(x, step, lr, cfg)
            step += 1
            consumed += cfg.global_batch
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.cpu()
            counted += 1
            if step % cfg.log_every == 0 or step == total:
                means = mean_across(torch.stack([sums[k] / counted for k in sorted(sums)]), world)
                elapsed = time.perf_counter() - interval_start
                last = {"step": step, "epoch": epoch, **dict(zip(sorted(sums), means.tolist())), "lr": lr, **norms,
                        "codebook_usage": _codebook_usage(run.model), "rejected": rejected, "world_size": world,
                        "images_per_s": counted * cfg.global_batch / elapsed, "data_wait_share": waited / elapsed,
                        "peak_memory_gb": peak_memory_gb(device)}
                sums, counted, interval_start, waited = {}, 0, time.perf_counter(), 0.0
                if rank == 0:
                    bar.set_postfix(rec=f"{last['reconstruction']:.4f}", psnr=f"{last['psnr']:.2f}")
                    if metrics_path:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(last) + "\n")
            if rank == 0 and cfg.image_every and step % cfg.image_every == 0:
                save_grid(x, recon, join(out_root, "samples", f"step-{step:08d}.png"), out_fs)
            last_of_run = step == total or consumed // cfg.global_batch >= steps_per_epoch and epoch + 1 >= cfg.epochs
            if rank == 0 and (step % cfg.ckpt_every == 0 or last_of_run):
                path, nbytes = save_checkpoint(cfg.out, step, run.state(step, epoch, consumed, args), so)
                log.info("checkpoint %s (%.1f MB)", redact_url(path), nbytes / 1e6)
            bar.update(1)
        if consumed // cfg.global_batch >= steps_per_epoch:
            epoch, consumed = epoch + 1, 0
    bar.close()
    if world > 1:
        dist.barrier()
    return last


def run_on_ray(cfg: TrainTokenizerConfig) -> dict:
    """Run :func:`train` on ``cfg.ray_workers`` Ray Train workers; returns the newest checkpoint's
    ``{"step", "path"}``."""
    run_on_ray_train(lambda: train(cfg), cfg.ray_workers)
    return latest_step(cfg.out, storage_options(cfg.storage_options))


def main(argv=None) -> None:
    trainer_main(TrainTokenizerConfig, train, run_on_ray, (UsageError, InputError, NoUsableImages, CheckpointError, FileNotFoundError), argv, __doc__)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # defined in __main__ by value, with everything they reference, and some of that does not pickle.
    from jobs.train_tokenizer import main as importable_main

    importable_main()
