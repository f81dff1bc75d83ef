"""Backend selection for the kernels.

``"torch"`` always runs the PyTorch reference. ``"triton"`` runs the Triton kernel: on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, which tests use).
``"auto"`` takes Triton for CUDA tensors when it is installed and the reference otherwise.
Unknown names fail loudly rather than silently falling back.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kernels.codebook_ref import codebook_lookup_torch
from kernels.ms_deform_attn_ref import ms_deform_attn_torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or use CUDA tensors, or backend='torch'"
        )
    return True


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention, (N, S, M, D) values -> (N, Lq, M*D); differentiable.

    Any batch size is accepted (upstream's CUDA op requires multiples of 64 above 64).
    See :func:`kernels.ms_deform_attn_ref.ms_deform_attn_torch` for the argument layouts.
    """
    if _use_triton(backend, value):
        from kernels.ms_deform_attn_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Nearest l2-normalised code for each vector of ``z`` (..., d) -> LongTensor (...)."""
    if _use_triton(backend, z):
        from kernels.codebook_triton import codebook_lookup_triton

        return codebook_lookup_triton(z, codebook)
    return codebook_lookup_torch(z, codebook)
