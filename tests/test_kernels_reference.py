"""Checks of the PyTorch reference kernels in :mod:`kernels` against independent implementations.

The references are the ground truth for any faster backend registered later, so they have to be
right on their own: the deformable-attention sampling convention (pixel = x * W - 0.5, zero
padding) is easy to get off by half a cell, upstream's CUDA op breaks on batches above 64 that are
not multiples of 64, and the codebook lookup is chunked, which must not change a single index.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
import kernels.codebook_ref

# Ragged pyramid: odd sizes, non-square, and a 2x2 level where most points fall near a border.
SHAPES = [(5, 7), (3, 4), (2, 2)]


# --------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# --------------------------------------------------------------------------------------------


def naive_ms_deform_attn(value, shapes, sampling_locations, attention_weights):
    """Scalar-loop transcription of Deformable DETR's CUDA im2col kernel, in float64.

    Every sampling point reads its four bilinear corners one by one; a corner outside the map
    reads zero, and a point with ``h <= -1 or w <= -1 or h >= H or w >= W`` is skipped outright,
    exactly as ``ms_deform_attn_im2col_bilinear`` does.
    """
    value = value.double()
    loc = sampling_locations.double().tolist()
    attn = attention_weights.double().tolist()
    n_batch, _, n_heads, dim = value.shape
    n_queries = sampling_locations.shape[1]
    n_points = sampling_locations.shape[4]
    out = torch.zeros(n_batch, n_queries, n_heads, dim, dtype=torch.float64)
    for b in range(n_batch):
        for q in range(n_queries):
            for m in range(n_heads):
                start = 0
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(n_points):
                        x, y = loc[b][q][m][lvl][p]
                        w_im, h_im = x * width - 0.5, y * height - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < height and w_im < width):
                            continue
                        h_low, w_low = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h_low, w_im - w_low
                        sample = torch.zeros(dim, dtype=torch.float64)
                        for hh, ww, wgt in (
                            (h_low, w_low, (1 - lh) * (1 - lw)),
                            (h_low, w_low + 1, (1 - lh) * lw),
                            (h_low + 1, w_low, lh * (1 - lw)),
                            (h_low + 1, w_low + 1, lh * lw),
                        ):
                            if 0 <= hh < height and 0 <= ww < width:
                                sample += wgt * value[b, start + hh * width + ww, m]
                        out[b, q, m] += attn[b][q][m][lvl][p] * sample
                    start += height * width
    return out.reshape(n_batch, n_queries, n_heads * dim)


def spatial_inputs(shapes=SHAPES):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def random_inputs(n_batch, n_queries, n_heads, dim, n_points, shapes=SHAPES, dtype=torch.float64, seed=0):
    """Random value / attention weights, locations spread over [-0.5, 1.5] (a third off the map)."""
    gen = torch.Generator().manual_seed(seed)
    n_levels = len(shapes)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n_batch, s, n_heads, dim, generator=gen, dtype=dtype)
    loc = torch.rand(n_batch, n_queries, n_heads, n_levels, n_points, 2, generator=gen, dtype=dtype) * 2 - 0.5
    logits = torch.randn(n_batch, n_queries, n_heads, n_levels * n_points, generator=gen, dtype=dtype)
    attn = logits.softmax(-1).view(n_batch, n_queries, n_heads, n_levels, n_points)
    return value, loc, attn


def with_special_points(loc, shapes=SHAPES):
    """Overwrite the first points of each level with the awkward cases: exact borders 0 and 1
    (corners and edges), pixel centres, the exact edge of the support (pixel -1 and pixel W/H),
    and points far off the map."""
    loc = loc.clone()
    for lvl, (h, w) in enumerate(shapes):
        cx, cy = 0.5 / w, 0.5 / h  # half a cell, in normalised units
        special = [
            (0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.5), (0.5, 1.0),  # borders of [0, 1]
            (cx, cy), (1 - cx, 1 - cy), (0.5, 0.5),  # pixel centres (0.5 is one on odd sizes)
            (-cx, 0.5), (0.5, -cy), (1 + cx, 0.5), (0.5, 1 + cy), (-cx, -cy),  # edge of the support
            (-3.0, 0.3), (5.0, 0.7), (0.5, -2.0), (0.2, 4.0),  # far off the map
        ]
        pts = torch.tensor(special, dtype=loc.dtype)
        level = loc[:, :, :, lvl].reshape(-1, 2)  # (N*Lq*M*P, 2) copy
        k = min(len(pts), level.shape[0])
        level[:k] = pts[:k]
        loc[:, :, :, lvl] = level.view_as(loc[:, :, :, lvl])
    return loc


def test_naive_matches_hand_computed_values():
    # Sanity check of the oracle itself on a 2x2 map with values 1, 2, 3, 4.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    loc = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.25, 0.75], [1.0, 0.5], [1.5, 0.5]], dtype=torch.float64)
    loc = loc.view(1, 5, 1, 1, 1, 2)
    attn = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    # centre -> mean; (0,0) -> pixel (-0.5,-0.5) -> a quarter of v[0,0]; (0.25,0.75) -> pixel
    # centre (x=0, y=1) -> v[1,0] = 3; x=1 -> pixel 1.5, half of the right column's mean; off map.
    expected = torch.tensor([2.5, 0.25, 3.0, 0.5 * 3.0, 0.0], dtype=torch.float64).view(1, 5, 1)
    torch.testing.assert_close(naive_ms_deform_attn(value, [(2, 2)], loc, attn), expected, rtol=0, atol=1e-15)
    spatial_shapes, level_start_index = spatial_inputs([(2, 2)])
    torch.testing.assert_close(
        kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float64, 1e-10), (torch.float32, 1e-5)],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ms_deform_attn_matches_naive(dtype, tol, backend):
    value, loc, attn = random_inputs(2, 5, 2, 3, 4, dtype=dtype)
    loc = with_special_points(loc)
    spatial_shapes, level_start_index = spatial_inputs()
    out = kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, backend=backend)
    assert out.shape == (2, 5, 2 * 3)
    assert out.dtype == dtype
    expected = naive_ms_deform_attn(value, SHAPES, loc, attn)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_ms_deform_attn_uses_level_start_index_offsets():
    # Levels laid out in value in a different order than spatial_shapes lists them: only
    # level_start_index says where each one lives.
    value, loc, attn = random_inputs(1, 4, 2, 3, 2)
    spatial_shapes, level_start_index = spatial_inputs()
    ref = kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    areas = [h * w for h, w in SHAPES]
    chunks = list(value.split(areas, dim=1))
    permuted = torch.cat([chunks[2], chunks[0], chunks[1]], dim=1)
    starts = torch.tensor([areas[2], areas[2] + areas[0], 0])
    out = kernels.ms_deform_attn(permuted, spatial_shapes, starts, loc, attn)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_batch", [1, 63, 65, 130])
def test_ms_deform_attn_any_batch_size(n_batch):
    # Upstream's CUDA op asserts batch % im2col_step == 0 with im2col_step = min(N, 64).
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = random_inputs(n_batch, 3, 2, 4, 2, shapes=shapes, dtype=torch.float32, seed=n_batch)
    spatial_shapes, level_start_index = spatial_inputs(shapes)
    out = kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    assert out.shape == (n_batch, 3, 2 * 4)
    alone = torch.cat(
        [
            kernels.ms_deform_attn(value[i : i + 1], spatial_shapes, level_start_index, loc[i : i + 1], attn[i : i + 1])
            for i in range(n_batch)
        ]
    )
    torch.testing.assert_close(out, alone, rtol=0, atol=1e-6)
    # First and last rows against the oracle too, so a batch-wide mistake cannot hide here.
    for i in {0, n_batch - 1}:
        expected = naive_ms_deform_attn(value[i : i + 1], shapes, loc[i : i + 1], attn[i : i + 1])
        torch.testing.assert_close(out[i : i + 1].double(), expected, rtol=0, atol=1e-5)


def test_ms_deform_attn_gradcheck():
    shapes = [(3, 4), (2, 3)]
    value, _, attn = random_inputs(1, 2, 2, 2, 2, shapes=shapes)
    spatial_shapes, level_start_index = spatial_inputs(shapes)
    # Bilinear sampling is not differentiable where a pixel coordinate is an integer (corner
    # switch) nor at the edge of the support, so draw pixel coordinates as integer + [0.2, 0.8]
    # over [-2, size + 1), i.e. including points partly and fully off the map.
    gen = torch.Generator().manual_seed(1)
    loc = torch.empty(1, 2, 2, len(shapes), 2, 2, dtype=torch.float64)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            cells = torch.randint(-2, size + 1, loc[..., lvl, :, axis].shape, generator=gen)
            frac = 0.2 + 0.6 * torch.rand(cells.shape, generator=gen, dtype=torch.float64)
            loc[..., lvl, :, axis] = (cells + frac + 0.5) / size
    inputs = (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_())

    def fn(v, sl, aw):
        return kernels.ms_deform_attn(v, spatial_shapes, level_start_index, sl, aw)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# Tolerances. Kernel-only: against fp32 on the *same* rounded inputs the sole extra error allowed
# is rounding the fp32 result to the output type, at most half an ulp, i.e. relative 2^-8 for
# bf16 (8 significant bits) and 2^-11 for fp16, plus a tiny atol for results at/near zero.
# End-to-end, against the original fp32 inputs, also absorbs rounding of the locations (bf16:
# up to ~0.01 of a cell on the 7-wide map), values and weights: observed max |error| over several
# seeds is 0.012 (bf16) and 0.0023 (fp16) on outputs of magnitude ~0.5, so atol 3e-2 / 5e-3.
LOW_PRECISION = [
    pytest.param(torch.bfloat16, 2**-8, 3e-2, id="bfloat16"),
    pytest.param(torch.float16, 2**-11, 5e-3, id="float16"),
]


@pytest.mark.parametrize(("dtype", "kernel_rtol", "end_to_end_atol"), LOW_PRECISION)
def test_ms_deform_attn_low_precision(dtype, kernel_rtol, end_to_end_atol):
    value, loc, attn = random_inputs(2, 6, 2, 4, 3, dtype=torch.float32, seed=3)
    spatial_shapes, level_start_index = spatial_inputs()
    lp_value, lp_loc, lp_attn = (t.to(dtype) for t in (value, loc, attn))
    out = kernels.ms_deform_attn(lp_value, spatial_shapes, level_start_index, lp_loc, lp_attn)
    assert out.dtype == dtype
    assert out.shape == (2, 6, 2 * 4)
    same_inputs = kernels.ms_deform_attn(
        lp_value.float(), spatial_shapes, level_start_index, lp_loc.float(), lp_attn.float()
    )
    torch.testing.assert_close(out.float(), same_inputs, rtol=kernel_rtol * 1.01, atol=1e-6)
    fp32 = kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    torch.testing.assert_close(out.float(), fp32, rtol=0, atol=end_to_end_atol)


def test_ms_deform_attn_level_start_index_with_total():
    # VFMTok (like Deformable DETR's callers in some forks) passes L+1 offsets ending with S.
    value, loc, attn = random_inputs(2, 4, 2, 3, 2)
    spatial_shapes, level_start_index = spatial_inputs()
    with_total = torch.cat([level_start_index, spatial_shapes.prod(1).sum().view(1)])
    assert with_total.shape == (len(SHAPES) + 1,)
    out_l = kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    out_l1 = kernels.ms_deform_attn(value, spatial_shapes, with_total, loc, attn)
    torch.testing.assert_close(out_l1, out_l, rtol=0, atol=0)


def test_ms_deform_attn_bad_backend():
    value, loc, attn = random_inputs(1, 2, 1, 2, 1)
    spatial_shapes, level_start_index = spatial_inputs()
    with pytest.raises(ValueError, match="backend"):
        kernels.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, backend="cuda")


# --------------------------------------------------------------------------------------------
# Codebook lookup
# --------------------------------------------------------------------------------------------


def brute_force_distances(z, codebook):
    """(rows, K) float64 squared distances between l2-normalised rows of z and of the codebook."""
    zn = z.double().reshape(-1, z.shape[-1])
    zn = zn / zn.norm(dim=-1, keepdim=True)
    en = codebook.double() / codebook.double().norm(dim=-1, keepdim=True)
    return ((zn[:, None, :] - en[None, :, :]) ** 2).sum(-1)


def random_codebook(k, d, seed):
    # Deliberately far from unit norm, with norms spread over two orders of magnitude.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=gen) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)].unsqueeze(1)


def separated_queries(n_rows, codebook, seed, margin=1e-4):
    """Random queries whose nearest code beats the runner-up by ``margin`` in float64, so that
    float32 rounding cannot legitimately change the answer and equality can be asserted."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4 * n_rows + 16, codebook.shape[1], generator=gen) * 3
    best2 = brute_force_distances(z, codebook).topk(2, dim=-1, largest=False).values
    keep = z[(best2[:, 1] - best2[:, 0]) > margin]
    assert keep.shape[0] >= n_rows
    return keep[:n_rows]


@pytest.mark.parametrize("lead", [(), (7,), (3, 50)], ids=["single", "flat", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_codebook_lookup_matches_brute_force(lead, dtype):
    codebook = random_codebook(300, 12, seed=0)
    z = separated_queries(math.prod(lead), codebook, seed=1).to(dtype).reshape(*lead, 12)
    out = kernels.codebook_lookup(z, codebook)
    assert out.dtype == torch.long
    assert out.shape == lead
    expected = brute_force_distances(z, codebook).argmin(-1).view(lead)
    assert torch.equal(out, expected)


def test_codebook_lookup_near_ties_pick_a_nearest_code():
    # Without the separation filter, every answer must still be within float32 noise of optimal.
    codebook = random_codebook(500, 12, seed=4)
    z = torch.randn(400, 12, generator=torch.Generator().manual_seed(5))
    out = kernels.codebook_lookup(z, codebook)
    dist = brute_force_distances(z, codebook)
    chosen = dist.gather(1, out.view(-1, 1)).squeeze(1)
    assert (chosen - dist.min(-1).values).max() < 1e-5


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 64])
def test_codebook_lookup_chunking_is_invisible(monkeypatch, rows_per_chunk):
    k = 300
    codebook = random_codebook(k, 12, seed=2)
    z = separated_queries(3 * 50, codebook, seed=3).view(3, 50, 12)  # 150 rows: 7 and 64 leave a remainder
    expected = brute_force_distances(z, codebook).argmin(-1).view(3, 50)
    unchunked = kernels.codebook_lookup(z, codebook)
    monkeypatch.setattr(kernels.codebook_ref, "_CHUNK_ELEMENTS", rows_per_chunk * k + k // 2)
    chunked = kernels.codebook_lookup(z, codebook)
    assert torch.equal(unchunked, expected)
    assert torch.equal(chunked, expected)


def test_codebook_lookup_cpu_chunks_give_the_codes_of_one_matrix(monkeypatch):
    # Tokens made on the CPU must not depend on the chunk size: 4 images x 256 queries against
    # 16384 codes (the official shape), each query halfway between two codes, so that its argmin
    # is decided by the last bit of the distances (chunks of 1, 3 or 7 rows flip about 1% of these),
    # with the CPU's default chunks (64 rows) and with the whole matrix in one chunk.
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(16384, 12, generator=g)
    unit = torch.nn.functional.normalize(codebook, dim=-1)
    pairs = torch.randint(0, len(codebook), (2, 4 * 256), generator=g)
    z = (unit[pairs[0]] + unit[pairs[1]]).view(4, 256, 12)
    assert kernels.codebook_ref._CHUNK_ELEMENTS // len(codebook) == 64
    chunked = kernels.codebook_lookup(z, codebook, backend="torch")
    monkeypatch.setattr(kernels.codebook_ref, "_CHUNK_ELEMENTS", 1 << 30)
    assert torch.equal(chunked, kernels.codebook_lookup(z, codebook, backend="torch"))


def test_codebook_lookup_chunk_smaller_than_codebook(monkeypatch):
    # _CHUNK_ELEMENTS below K must still make progress (one row per chunk), not loop forever or skip.
    codebook = random_codebook(300, 12, seed=6)
    z = separated_queries(20, codebook, seed=7)
    monkeypatch.setattr(kernels.codebook_ref, "_CHUNK_ELEMENTS", 10)
    assert torch.equal(kernels.codebook_lookup(z, codebook), brute_force_distances(z, codebook).argmin(-1))


def test_codebook_lookup_ties_break_to_lowest_index(monkeypatch):
    # Axis-aligned codes normalise exactly, so duplicates (same direction, different norm) give
    # bit-identical distances in any arithmetic, and queries on a diagonal tie two directions.
    e = torch.eye(3)
    codebook = torch.stack([0.5 * e[2], 2 * e[0], -e[1], e[0], 3 * e[1], e[1], 4 * e[2], -2 * e[1]])
    z = torch.tensor(
        [
            [5.0, 0.0, 0.0],  # e0: codes 1 and 3 -> 1
            [0.0, 0.2, 0.0],  # e1: codes 4 and 5 -> 4
            [0.0, -1.0, 0.0],  # -e1: codes 2 and 7 -> 2
            [0.0, 0.0, 9.0],  # e2: codes 0 and 6 -> 0
            [1.0, 1.0, 0.0],  # e0 / e1 tie -> 1
            [0.0, 1.0, 1.0],  # e1 / e2 tie -> 0
            [0.0, -3.0, 3.0],  # -e1 / e2 tie -> 0
            [1.0, 1.0, 1.0],  # three-way tie -> 0
        ]
    )
    expected = torch.tensor([1, 4, 2, 0, 1, 0, 0, 0])
    dist = brute_force_distances(z, codebook)
    assert torch.equal(dist.argmin(-1), expected)  # torch.argmin's own rule, for reference
    assert torch.equal(kernels.codebook_lookup(z, codebook), expected)
    monkeypatch.setattr(kernels.codebook_ref, "_CHUNK_ELEMENTS", 3 * len(codebook))
    assert torch.equal(kernels.codebook_lookup(z, codebook), expected)


def test_codebook_lookup_dim_mismatch():
    with pytest.raises(ValueError, match="dim"):
        kernels.codebook_lookup(torch.randn(4, 12), torch.randn(16, 8))


def test_codebook_lookup_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        kernels.codebook_lookup(torch.randn(4, 12), torch.randn(16, 12), backend="triton-nope")


def test_level_layout_is_validated():
    value = torch.zeros(1, 5, 1, 2)
    shapes = torch.tensor([[2, 2], [1, 1]])
    loc = torch.full((1, 1, 1, 2, 1, 2), 0.5)
    w = torch.full((1, 1, 1, 2, 1), 0.5)
    with pytest.raises(ValueError, match="outside"):
        kernels.ms_deform_attn(value, shapes, torch.tensor([0, 5]), loc, w)
    with pytest.raises(ValueError, match="entries for 2 levels"):
        kernels.ms_deform_attn(value, shapes, torch.tensor([0]), loc, w)
    with pytest.raises(ValueError, match="cover"):
        kernels.ms_deform_attn(torch.zeros(1, 6, 1, 2), shapes, torch.tensor([0, 4]), loc, w)


def test_empty_codebook_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        kernels.codebook_lookup(torch.zeros(3, 12), torch.zeros(0, 12))
