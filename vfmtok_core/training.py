"""Training utilities for the GPT and the tokenizer: the upstream optimiser recipes and learning-rate
schedule, an EMA of the weights, and the throughput and MFU accounting of a run."""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (tensors of 2+ dims), as upstream.

    One fused kernel for all parameters on CUDA; elsewhere the multi-tensor (foreach) path, which
    updates all parameters with a few vectorised ops instead of a Python loop over them."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None, foreach=None if on_cuda else True)


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int, warmup_init: float = 1e-7,
                     min_lr: float | None = None) -> float:
    """The tokenizer's schedule (timm's ``CosineLRScheduler`` with a warmup prefix, per step): linear
    from ``warmup_init`` to ``lr`` over ``warmup_steps``, then a cosine to ``min_lr`` over the rest.
    Upstream sets ``min_lr`` to ``lr``, which makes everything after the warmup constant; that is
    the default here (``min_lr=None``)."""
    if step < warmup_steps:
        return warmup_init + step * (lr - warmup_init) / warmup_steps
    floor = lr if min_lr is None else min_lr
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * t))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class EMA:
    """Exponential moving average of a model's trained parameters (buffers untouched), kept in fp32.

    Built from the parameters as they are after wrapping: under FSDP they are sharded DTensors and
    the average stays sharded the same way, so it costs no communication per step. Its state dict
    holds full tensors under the model's own parameter names (``GPT.from_pretrained`` loads it).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Frozen parameters (the tokenizer's DINOv2) never move: averaging them would only cost memory.
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema += (1 - decay) * (param - ema)`` for every trained parameter in one multi-tensor op
        (a Python loop over XL's hundreds of tensors costs a launch each on a GPU)."""
        current = [p.detach() for p in model.parameters() if p.requires_grad]
        averages = list(self.params.values())
        if any(p.dtype != torch.float32 for p in current):
            current = [p.float() for p in current]
        torch._foreach_lerp_(averages, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors (a collective call under FSDP: every rank must make it)."""
        return {k: (v.full_tensor() if _is_dtensor(v) else v).cpu() for k, v in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.params.items():
            full = state[name].to(torch.float32)
            if _is_dtensor(t):
                from torch.distributed.tensor import distribute_tensor

                t.copy_(distribute_tensor(full.to(t.device_mesh.device_type), t.device_mesh, t.placements))
            else:
                t.copy_(full)


# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def peak_tflops(device: torch.device) -> float:
    """The device's dense bf16 peak, or 0.0 when it is not known (a CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6 per weight of every matrix multiply
    (embedding lookups excluded, the output head included) plus attention's 12 * layers * dim * seq
    (the scores and the weighted sum), as MFU is usually defined (PaLM, appendix B)."""
    cfg = model.config
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if p.dim() >= 2 and "embedding" not in name)
    return 6.0 * weights + 12.0 * cfg.n_layer * cfg.dim * seq_len


class Throughput:
    """Per-log-interval training speed of one rank, reported for the whole run (ranks step in
    lockstep): samples/s, tokens/s, model FLOP/s, MFU against ``peak_tflops`` per rank, peak
    memory, and the time spent waiting for data."""

    def __init__(self, model: nn.Module, peak_tflops: float, world: int):
        self.model, self.peak, self.world = model, peak_tflops, world
        self._per_token: dict[int, float] = {}  # by sequence length
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.tokens, self.flops, self.wait = time.perf_counter(), 0, 0, 0.0, 0.0

    @contextlib.contextmanager
    def waiting(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - t

    def count(self, samples: int, seq_len: int) -> None:
        self.samples += samples
        self.tokens += samples * seq_len
        if seq_len not in self._per_token:
            self._per_token[seq_len] = model_flops_per_token(self.model, seq_len)
        self.flops += samples * seq_len * self._per_token[seq_len]

    def report(self, device: torch.device) -> dict:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        flops_per_s = self.flops * self.world / elapsed
        out = {
            "samples_per_s": self.samples * self.world / elapsed,
            "tokens_per_s": self.tokens * self.world / elapsed,
            "model_tflops_per_s": flops_per_s / 1e12,
            "mfu": flops_per_s / (self.peak * 1e12 * self.world) if self.peak else None,
            "data_wait_s": self.wait,
            "data_wait_share": self.wait / elapsed,
            "peak_memory_gb": peak_memory_gb(device),
        }
        self._reset()
        return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory allocated on the GPU, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
