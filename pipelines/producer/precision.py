"""The tokenization job's precision names, and what each means on the device an actor lands on.

The job is configured on a driver that may have no GPU, so ``auto`` is resolved by each actor,
where the device is known: bf16 autocast on CUDA (the throughput default), fp32 elsewhere, so that
tokens made on a CPU stay bitwise what fp32 always gave. ``tf32`` only changes CUDA math; on any
other device it resolves to ``fp32`` so that reports say what actually ran.

The float32 math mode is set around each forward and restored after it, rather than once per
process: torch's default lets cuDNN convolutions use TF32 even in "fp32", so ``fp32`` asks for
IEEE float32 explicitly, and code that shares the process keeps its own setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

PRECISIONS = ("auto", "fp32", "bf16", "tf32")


def resolve_precision(precision: str, device: str) -> str:
    """The precision that runs on ``device`` (``"cuda"``, ``"cpu"``...): ``fp32``, ``bf16`` or ``tf32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    on_cuda = device.split(":")[0] == "cuda"
    if precision == "auto":
        return "bf16" if on_cuda else "fp32"
    if precision == "tf32" and not on_cuda:
        return "fp32"
    return precision


def model_precision(resolved: str) -> str:
    """What :class:`vfmtok_core.VFMTokenizer` is built with: it knows fp32 and bf16 (TF32 is fp32
    math with a faster matmul mode, set by :func:`fp32_math`)."""
    return "bf16" if resolved == "bf16" else "fp32"


@contextlib.contextmanager
def fp32_math(resolved: str) -> Iterator[None]:
    """Float32 CUDA matmuls and convolutions in TF32 for ``tf32``, IEEE float32 otherwise (ops that
    bf16 autocast leaves in float32 included); the previous settings are restored on exit.
    Uses torch's ``fp32_precision`` settings only: torch refuses to mix them with ``allow_tf32``."""
    import torch

    mode = "tf32" if resolved == "tf32" else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision, conv.fp32_precision = mode, mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
