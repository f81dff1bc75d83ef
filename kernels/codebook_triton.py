"""Nearest l2-normalised code in Triton: one pass over the codebook, no N x K matrix in memory.

Each program keeps ``BLOCK_N`` query rows in registers and streams the codebook in ``BLOCK_K``
tiles, carrying the running minimum of ``|z|^2 + |e|^2 - 2 z.e`` and its index. A tile replaces the
running best only when strictly smaller, and within a tile the first minimum wins, so exact ties
resolve to the lowest index, as ``torch.argmin`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _codebook_kernel(z_ptr, e_ptr, out_ptr, N, K, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask_n = rows < N
    mask_d = dims < D
    z = tl.load(z_ptr + rows[:, None] * D + dims[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    z_sq = tl.sum(z * z, axis=1)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        mask_k = codes < K
        e = tl.load(e_ptr + codes[:, None] * D + dims[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        e_sq = tl.sum(e * e, axis=1)
        dot = tl.dot(z, tl.trans(e), input_precision="ieee")
        dist = (z_sq[:, None] + e_sq[None, :]) - 2.0 * dot
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)
        tile_idx = tl.argmin(dist, axis=1).to(tl.int64) + k0
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(out_ptr + rows, best_idx, mask=mask_n)


def codebook_lookup_triton(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`kernels.codebook_ref.codebook_lookup_torch`."""
    if z.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"vector dim {z.shape[-1]} does not match codebook dim {codebook.shape[-1]}")
    if codebook.ndim != 2 or codebook.shape[0] == 0:
        raise ValueError(f"codebook must be a non-empty (K, d) matrix, got {tuple(codebook.shape)}")
    lead = z.shape[:-1]
    flat = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1).contiguous()
    codes = F.normalize(codebook.float(), dim=-1).contiguous()
    n, d = flat.shape
    k = codes.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out.view(lead)
    block_d = max(16, triton.next_power_of_2(d))
    # Large tiles suit both the GPU and the interpreter (whose cost is per program and per op).
    block_k = min(1024, max(16, triton.next_power_of_2(k)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    _codebook_kernel[(triton.cdiv(n, block_n),)](flat, codes, out, n, k, d, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return out.view(lead)
