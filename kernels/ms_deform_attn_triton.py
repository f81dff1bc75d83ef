"""Multi-scale deformable attention in Triton: forward and backward, any batch size, no build step.

Layout and sampling convention are the CUDA op's (see :mod:`kernels.ms_deform_attn_ref`): a
location x in [0, 1] maps to pixel x * W - 0.5, bilinear taps outside the map contribute zero.
Inputs may be fp32, bf16 or fp16; sampling and accumulation are always fp32.

One program handles ``BLOCK_Q`` queries of one (batch, head) pair and all D channels, looping over
levels and points; the backward pass recomputes the taps, scatters value gradients with fp32
atomics and reduces location and weight gradients over channels in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ms_deform_attn_ref import check_level_layout, level_shapes


@triton.jit
def _corner(value_ptr, base, hh, ww, H, W, start, stride_s, offs_d, mask_q, mask_d):
    """Values (BLOCK_Q, BLOCK_D) at integer pixel (hh, ww) of one level; zero outside the map."""
    valid = mask_q & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    idx = start + tl.where(valid, hh * W + ww, 0)
    ptrs = value_ptr + base + idx[:, None] * stride_s + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32), valid, idx


@triton.jit
def _program_tile(Lq, S, M, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), query and channel offsets with their masks, and the offset of
    its (batch, head) in the (N, S, M, D) value tensor."""
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    return n, m, offs_q, offs_d, offs_q < Lq, offs_d < D, n * S * M * D + m * D


@triton.jit
def _taps(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, n, m, l, p, Lq, M, D,
    offs_q, offs_d, mask_q, mask_d, base, L: tl.constexpr, P: tl.constexpr,
):
    """Bilinear taps of level l, point p for BLOCK_Q queries: the flat index of the (level, point)
    slot in the (N, Lq, M, L, P) weights, the weights, the level's H and W, the fractional offsets,
    the bilinear sample and the four corner values (BLOCK_Q, BLOCK_D), and each corner's validity and
    row index."""
    H = tl.load(shapes_ptr + 2 * l)
    W = tl.load(shapes_ptr + 2 * l + 1)
    start = tl.load(starts_ptr + l)
    stride_s = M * D
    wi = ((n * Lq + offs_q) * M + m) * (L * P) + l * P + p
    a = tl.load(attn_ptr + wi, mask=mask_q, other=0.0).to(tl.float32)
    x = tl.load(loc_ptr + 2 * wi, mask=mask_q, other=0.0).to(tl.float32)
    y = tl.load(loc_ptr + 2 * wi + 1, mask=mask_q, other=0.0).to(tl.float32)
    h = y * H - 0.5
    w = x * W - 0.5
    h0f = tl.floor(h)
    w0f = tl.floor(w)
    h0 = h0f.to(tl.int32)
    w0 = w0f.to(tl.int32)
    v00, k00, i00 = _corner(value_ptr, base, h0, w0, H, W, start, stride_s, offs_d, mask_q, mask_d)
    v01, k01, i01 = _corner(value_ptr, base, h0, w0 + 1, H, W, start, stride_s, offs_d, mask_q, mask_d)
    v10, k10, i10 = _corner(value_ptr, base, h0 + 1, w0, H, W, start, stride_s, offs_d, mask_q, mask_d)
    v11, k11, i11 = _corner(value_ptr, base, h0 + 1, w0 + 1, H, W, start, stride_s, offs_d, mask_q, mask_d)
    lh = h - h0f
    lw = w - w0f
    sample = ((1 - lh) * (1 - lw))[:, None] * v00 + ((1 - lh) * lw)[:, None] * v01 \
        + (lh * (1 - lw))[:, None] * v10 + (lh * lw)[:, None] * v11
    return wi, a, H, W, lh, lw, sample, v00, v01, v10, v11, k00, k01, k10, k11, i00, i01, i10, i11


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    Lq, S, M, D,
    L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, m, offs_q, offs_d, mask_q, mask_d, base = _program_tile(Lq, S, M, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for l in tl.static_range(L):
        for p in tl.static_range(P):
            _, a, _, _, _, _, sample, _, _, _, _, _, _, _, _, _, _, _, _ = _taps(
                value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, n, m, l, p, Lq, M, D,
                offs_q, offs_d, mask_q, mask_d, base, L, P,
            )
            acc += a[:, None] * sample
    out_ptrs = out_ptr + ((n * Lq + offs_q)[:, None] * M + m) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=mask_q[:, None] & mask_d[None, :])


@triton.jit
def _scatter(grad_value_ptr, base, idx, valid, stride_s, offs_d, mask_d, contrib):
    ptrs = grad_value_ptr + base + idx[:, None] * stride_s + offs_d[None, :]
    tl.atomic_add(ptrs, contrib, mask=valid[:, None] & mask_d[None, :])


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    Lq, S, M, D,
    L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, m, offs_q, offs_d, mask_q, mask_d, base = _program_tile(Lq, S, M, D, BLOCK_Q, BLOCK_D)
    go_ptrs = grad_out_ptr + ((n * Lq + offs_q)[:, None] * M + m) * D + offs_d[None, :]
    go = tl.load(go_ptrs, mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    for l in tl.static_range(L):
        for p in tl.static_range(P):
            wi, a, H, W, lh, lw, sample, v00, v01, v10, v11, k00, k01, k10, k11, i00, i01, i10, i11 = _taps(
                value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, n, m, l, p, Lq, M, D,
                offs_q, offs_d, mask_q, mask_d, base, L, P,
            )
            hh = 1 - lh
            hw = 1 - lw
            tl.store(grad_attn_ptr + wi, tl.sum(go * sample, axis=1), mask=mask_q)
            d_lw = hh[:, None] * (v01 - v00) + lh[:, None] * (v11 - v10)
            d_lh = hw[:, None] * (v10 - v00) + lw[:, None] * (v11 - v01)
            tl.store(grad_loc_ptr + 2 * wi, a * W * tl.sum(go * d_lw, axis=1), mask=mask_q)
            tl.store(grad_loc_ptr + 2 * wi + 1, a * H * tl.sum(go * d_lh, axis=1), mask=mask_q)
            ga = a[:, None] * go
            _scatter(grad_value_ptr, base, i00, k00, M * D, offs_d, mask_d, (hh * hw)[:, None] * ga)
            _scatter(grad_value_ptr, base, i01, k01, M * D, offs_d, mask_d, (hh * lw)[:, None] * ga)
            _scatter(grad_value_ptr, base, i10, k10, M * D, offs_d, mask_d, (lh * hw)[:, None] * ga)
            _scatter(grad_value_ptr, base, i11, k11, M * D, offs_d, mask_d, (lh * lw)[:, None] * ga)


def _launch_args(value, spatial_shapes, level_start_index, sampling_locations):
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    starts = check_level_layout(shapes, level_start_index, n_levels, s)
    dev = value.device
    shapes_t = torch.tensor(shapes, dtype=torch.int32, device=dev).flatten()
    starts_t = torch.tensor(starts, dtype=torch.int32, device=dev)
    block_d = max(16, triton.next_power_of_2(d))
    block_q = max(1, min(64, 4096 // block_d, triton.next_power_of_2(lq)))
    grid = (triton.cdiv(lq, block_q), n * m)
    return (n, s, m, d, lq, n_levels, n_points), shapes_t, starts_t, block_q, block_d, grid


class MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        (n, s, m, d, lq, nl, npt), shapes_t, starts_t, bq, bd, grid = _launch_args(
            value, spatial_shapes, level_start_index, sampling_locations
        )
        out = torch.empty(n, lq, m * d, device=value.device, dtype=torch.float32)
        _msda_fwd_kernel[grid](value, shapes_t, starts_t, sampling_locations, attention_weights, out,
                               lq, s, m, d, L=nl, P=npt, BLOCK_Q=bq, BLOCK_D=bd)
        ctx.save_for_backward(value, sampling_locations, attention_weights, shapes_t, starts_t)
        ctx.meta = (n, s, m, d, lq, nl, npt, bq, bd, grid)
        return out.to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn, shapes_t, starts_t = ctx.saved_tensors
        n, s, m, d, lq, nl, npt, bq, bd, grid = ctx.meta
        grad_value = torch.zeros(value.shape, device=value.device, dtype=torch.float32)
        grad_loc = torch.empty(loc.shape, device=value.device, dtype=torch.float32)
        grad_attn = torch.empty(attn.shape, device=value.device, dtype=torch.float32)
        _msda_bwd_kernel[grid](value, shapes_t, starts_t, loc, attn, grad_out.contiguous(),
                               grad_value, grad_loc, grad_attn,
                               lq, s, m, d, L=nl, P=npt, BLOCK_Q=bq, BLOCK_D=bd)
        return grad_value.to(value.dtype), None, None, grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Same contract as :func:`kernels.ms_deform_attn_ref.ms_deform_attn_torch`, differentiable."""
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
