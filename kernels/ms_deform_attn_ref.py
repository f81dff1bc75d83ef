"""PyTorch reference for multi-scale deformable attention.

Bilinear sampling with zero padding outside each feature map, done with ``F.grid_sample``
(``align_corners=False``), which is exactly the convention of the CUDA op released with Deformable
DETR: a normalised location ``x`` maps to pixel coordinate ``x * W - 0.5``. The computation always
runs in float32 (or float64 when given float64, for gradient checks) because sampling locations
need the mantissa: in bf16 a location on a 24-wide map is off by up to a tenth of a cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_shapes(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    """The (H, W) of each level as Python ints (one host sync, done once per call)."""
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def check_level_layout(
    shapes: list[tuple[int, int]], level_start_index: torch.Tensor, n_levels: int, s: int
) -> list[int]:
    """Validate the level layout once on the host; returns the start offset of each level.

    ``level_start_index`` may carry a trailing total (VFMTok's official code passes L+1 entries).
    Like the CUDA op, levels may be stored in any order, but each must lie inside ``value``: a
    short list or an out-of-range offset would otherwise read foreign memory or fail obscurely.
    """
    if len(shapes) != n_levels:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels, sampling_locations has {n_levels}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"value has {s} positions but spatial_shapes cover {sum(sizes)}")
    given = [int(i) for i in level_start_index.tolist()]
    if len(given) not in (n_levels, n_levels + 1):
        raise ValueError(f"level_start_index has {len(given)} entries for {n_levels} levels")
    starts = given[:n_levels]
    if any(start < 0 or start + size > s for start, size in zip(starts, sizes)):
        raise ValueError(f"level_start_index {given} puts a level outside the {s} value positions")
    return starts


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) values of all levels, flattened level-major then row-major.
        spatial_shapes: (L, 2) int64, rows (H_l, W_l).
        level_start_index: (L,) or (L+1,) offsets of each level in ``S``.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; points outside
            the map contribute zero.
        attention_weights: (N, Lq, M, L, P), already normalised over L*P.

    Returns:
        (N, Lq, M*D) in the dtype of ``value``.
    """
    out_dtype = value.dtype
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    starts = check_level_layout(shapes, level_start_index, n_levels, s)

    value = value.to(compute)
    # grid_sample wants coordinates in [-1, 1]; one (N*M) "image" per head.
    grid = (2 * sampling_locations.to(compute) - 1).permute(0, 2, 1, 3, 4, 5).flatten(0, 1)
    weights = attention_weights.to(compute).transpose(1, 2).reshape(n * m, 1, lq, n_levels, n_points)
    out = None
    # Weight and reduce each level as it is sampled: no (N*M, D, Lq, L*P) stack is materialised.
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled = F.grid_sample(v, grid[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * weights[..., level, :]).sum(-1)  # (N*M, D, Lq)
        out = part if out is None else out + part
    out = out.view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)
