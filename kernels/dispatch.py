"""Backend selection for the kernels.

``backend="torch"`` always runs the PyTorch reference. ``"auto"`` picks the fastest
implementation available for the tensors' device; until Triton kernels are registered that is the
reference on every device. Unknown names fail loudly rather than silently falling back.
"""

from __future__ import annotations

import torch

from kernels.codebook_ref import codebook_lookup_torch
from kernels.ms_deform_attn_ref import ms_deform_attn_torch

BACKENDS = ("auto", "torch")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention, (N, S, M, D) values -> (N, Lq, M*D).

    Any batch size is accepted (upstream's CUDA op requires multiples of 64 above 64).
    See :func:`kernels.ms_deform_attn_ref.ms_deform_attn_torch` for the argument layouts.
    """
    _check_backend(backend)
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Nearest l2-normalised code for each vector of ``z`` (..., d) -> LongTensor (...)."""
    _check_backend(backend)
    return codebook_lookup_torch(z, codebook)
