"""PyTorch reference for the l2-normalised nearest-codebook lookup.

VFMTok quantises each 12-d query against an l2-normalised codebook by the argmin of
``|z|^2 + |e|^2 - 2 z.e`` on normalised vectors. We keep that formula (not the algebraically
equal argmax of ``z.e``) so exact ties resolve as upstream's, to the lowest index; near-ties
within float32 rounding may still differ across devices and BLAS libraries.
The distance matrix is built in row chunks so that a 64-image batch against 16384 codes does
not allocate a 1 GiB N x K matrix. On the CPU the chunks are small (4 MiB): a 64 MiB temporary is
above glibc's largest mmap threshold, so each chunk was a fresh mapping whose pages the kernel
faulted in and zeroed, most of the lookup's time (``python -m bench.kernels`` prints the speed-up
of the lookup and of a ``tiny`` encode). With 16384 codes a 4 MiB chunk is 64 rows; MKL gives blocks of 12 rows or more
the same bits as one large matrix (checked on this machine for every size up to 300), so the codes
do not depend on the chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 distances per chunk: 4 MiB on the CPU (see above), 64 MiB on accelerators (fewer launches).
_CHUNK_ELEMENTS = 1 << 20
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


def codebook_lookup_torch(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest l2-normalised code for every vector.

    Args:
        z: (..., d) vectors, any float dtype; normalised here in float32.
        codebook: (K, d) code vectors, normalised here (stored weights need not be unit-norm).

    Returns:
        LongTensor of shape ``z.shape[:-1]``.
    """
    if z.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"vector dim {z.shape[-1]} does not match codebook dim {codebook.shape[-1]}")
    if codebook.ndim != 2 or codebook.shape[0] == 0:
        raise ValueError(f"codebook must be a non-empty (K, d) matrix, got {tuple(codebook.shape)}")
    lead = z.shape[:-1]
    flat = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)
    codes = F.normalize(codebook.float(), dim=-1)
    code_sq = codes.pow(2).sum(-1)
    budget = _CHUNK_ELEMENTS if z.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    rows = max(1, budget // max(1, codes.shape[0]))
    out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows]
        # |z|^2 + |e|^2 - 2 z.e with the matmul, scaling and addition fused into one pass.
        dist = torch.addmm(chunk.pow(2).sum(-1, keepdim=True) + code_sq, chunk, codes.t(), alpha=-2)
        out[start : start + rows] = dist.argmin(-1)
    return out.view(lead)
