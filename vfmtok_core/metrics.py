"""Image-generation and reconstruction metrics: FID, IS, precision/recall, PSNR, SSIM, codebook use.

VFMTok reports its generation numbers (FID, sFID, IS, precision, recall) with the ADM evaluator
(``openai/guided-diffusion``, ``evaluations/evaluator.py``), and its tokenizer numbers (rFID, rIS,
PSNR, SSIM, codebook usage) from ``vqgan_test.py``. This module recomputes every one of them from
arrays the caller already holds: Inception activations/logits (produced elsewhere) and float
images. The definitions follow ADM's functions, named in each docstring; where this module
deliberately computes in higher precision than ADM, the docstring says so and why.

Everything here is numpy/scipy only (no torch import) and returns plain Python floats or float64
numpy arrays, so it can run on the CPU next to the evaluation job.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from scipy.linalg import sqrtm
from scipy.ndimage import uniform_filter1d
from scipy.special import log_softmax

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "FRECHET_METHODS",
    "inception_score",
    "precision_recall",
    "psnr",
    "ssim",
    "codebook_usage",
    "codebook_perplexity",
    "IMAG_ATOL",
]

# ADM accepts a complex matrix square root when every diagonal entry's imaginary part is within
# this absolute tolerance (``np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)``).
IMAG_ATOL = 1e-3


# --------------------------------------------------------------------------------------------
# Frechet distance (FID / sFID)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of a feature set: mean ``mu`` (D,) and covariance ``sigma`` (D, D).

    Mirrors ADM's ``FIDStatistics``; a reference ``.npz`` with ``mu``/``sigma`` (or ``mu_s``/
    ``sigma_s`` for sFID) can be wrapped directly as ``FeatureStats(npz["mu"], npz["sigma"])``.
    """

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_activations(cls, acts: ArrayLike) -> "FeatureStats":
        """Statistics of activations ``acts`` (N, D), as ADM's ``Evaluator.compute_statistics``.

        The covariance is ``np.cov(acts, rowvar=False)``, i.e. the unbiased (N - 1) estimate,
        exactly as ADM. Both moments are computed in float64; ADM takes the mean of the float32
        activations in float32 (``np.cov`` is float64 there too), so ``mu`` here can differ from
        ADM's in the last float32 digits, a negligible effect on FID.
        """
        x = np.asarray(acts, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"activations must be (N, D), got shape {x.shape}")
        if x.shape[0] < 2:
            raise ValueError("need at least 2 activations to estimate a covariance")
        mu = x.mean(axis=0)
        sigma = np.atleast_2d(np.cov(x, rowvar=False))
        return cls(mu=mu, sigma=sigma)

    def frechet_distance(self, other: "FeatureStats", eps: float = 1e-6, method: str = "eigh") -> float:
        """Shorthand for :func:`frechet_distance` ``(self, other, eps, method)``."""
        return frechet_distance(self, other, eps=eps, method=method)


FRECHET_METHODS = ("eigh", "sqrtm")


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr(sqrtm(S1 S2))`` for covariances, through symmetric eigendecompositions: with
    ``R = S1^(1/2)``, ``S1 S2`` is similar to the PSD ``R S2 R``, whose root's trace is the sum of
    the roots of its eigenvalues. Same value as ``sqrtm`` (about 1e-15 relative on full-rank
    2048-d statistics), several times faster at 2048 dimensions, and never complex."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6, method: str = "eigh") -> float:
    """Frechet distance between two Gaussians, as ADM's ``FIDStatistics.frechet_distance``.

    ``method="sqrtm"`` computes it as ADM does, to its last digit; ``"eigh"`` (the default) takes the
    root's trace from symmetric eigendecompositions (:func:`_trace_sqrt_product`), the same value
    in a fraction of the time (a 2048-d ``sqrtm`` takes seconds), so a run with many
    evaluations, or the test suite, does not wait on it.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b))``. The distance is symmetric in
    exact arithmetic; ADM calls it as ``sample_stats.frechet_distance(ref_stats)``, so pass
    ``(sample, reference)`` to reproduce its rounding exactly.

    Two numerical safeguards copied in behaviour from ADM (which took them from TTUR's ``fid.py``):

    * If ``sqrtm(S_a @ S_b)`` is not finite (an almost singular product), a warning is issued and
      the root is recomputed as ``sqrtm((S_a + eps I) @ (S_b + eps I))``. Only the square-root
      term uses the offset; the traces stay those of the unmodified covariances.
    * If the root comes back complex, it is accepted only when every *diagonal* entry's
      imaginary part is within ``IMAG_ATOL`` = 1e-3 (absolute); then the real part is used.
      Otherwise ``ValueError`` is raised, reporting the largest imaginary magnitude anywhere in
      the matrix.

    ``scipy.linalg.sqrtm`` is called without ADM's ``disp=False`` (deprecated in SciPy 1.16);
    ADM discarded the error estimate that argument returns, so the result is unchanged.
    """
    mu1 = np.atleast_1d(np.asarray(a.mu, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(b.mu, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(a.sigma, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(b.sigma, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if s1.shape != s2.shape:
        raise ValueError(f"covariances differ in shape: {s1.shape} vs {s2.shape}")

    diff = mu1 - mu2
    if method not in FRECHET_METHODS:
        raise ValueError(f"method must be one of {FRECHET_METHODS}, got {method!r}")
    if method == "eigh":
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))
    covmean = sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Frechet distance: sqrtm of the covariance product is not finite (near-singular "
            f"product); retrying with {eps} added to the diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + offset) @ (s2 + offset))

    if np.iscomplexobj(covmean):
        if not np.all(np.abs(np.diagonal(covmean).imag) <= IMAG_ATOL):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"Frechet distance: sqrtm has a significant imaginary part ({worst})")
        covmean = covmean.real

    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------------


def inception_score(logits: ArrayLike, split_size: int = 5000) -> float:
    """Inception score from classifier *logits* (N, K), as ADM's ``Evaluator.compute_inception_score``.

    Input: logits, not probabilities. ADM feeds pool_3 activations (N, 2048) through
    ``softmax(pool_3 @ W)`` where ``W`` is the weight matrix of the Inception graph's
    ``softmax/logits/MatMul`` (ADM adds no bias); the caller passes ``pool_3 @ W`` here. The
    softmax is taken in float64 via a log-softmax, which is numerically stable and gives exact
    log-probabilities; ADM's float32 TF softmax followed by ``np.log`` would yield NaN if a
    probability underflowed to 0, where this treats ``0 * log 0`` as 0.

    Splits follow ADM exactly: consecutive, unshuffled chunks ``[i, i + split_size)`` for
    ``i = 0, split_size, 2 split_size, ...``, so a final partial chunk (even a single sample)
    forms its own split and counts with the same weight as the full ones. Each split scores
    ``exp(mean_x KL(p(y|x) || p_split(y)))`` with ``p_split`` the split's mean prediction, and
    the result is the plain mean of the split scores; ADM returns only that mean (no std).
    With ADM's protocol, 50,000 samples give 10 splits of 5,000.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, K) array, got shape {z.shape}")
    if split_size < 1:
        raise ValueError("split_size must be >= 1")
    scores = []
    for start in range(0, z.shape[0], split_size):
        logp = log_softmax(z[start : start + split_size], axis=1)
        p = np.exp(logp)
        with np.errstate(divide="ignore"):
            log_marginal = np.log(p.mean(axis=0, keepdims=True))
        terms = np.where(p > 0, p * (logp - log_marginal), 0.0)
        scores.append(math.exp(float(terms.sum(axis=1).mean())))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkaanniemi et al. 2019), ADM's ManifoldEstimator
# --------------------------------------------------------------------------------------------


def _sq_dists(u: np.ndarray, v: np.ndarray, u_sq: np.ndarray, v_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(u), len(v)) via |u|^2 - 2 u.v + |v|^2, clamped at 0,
    the same expansion ADM's ``_batch_pairwise_distances`` uses."""
    d = u @ v.T
    d *= -2.0
    d += u_sq[:, None]
    d += v_sq[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _knn_radii(x: np.ndarray, x_sq: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance from each row of ``x`` to its k-th nearest row of ``x``, the row itself
    counting as neighbour 0 (ADM's ``ManifoldEstimator.manifold_radii``).

    ADM materialises (row_batch, N) distances per row block; here the k + 1 smallest values of each
    row are carried across column blocks, so memory is (batch, batch) whatever N is.
    """
    n = x.shape[0]
    radii = np.empty(n, dtype=x.dtype)
    for r0 in range(0, n, batch):
        r1 = min(r0 + batch, n)
        best = np.full((r1 - r0, k + 1), np.inf, dtype=x.dtype)
        for c0 in range(0, n, batch):
            c1 = min(c0 + batch, n)
            d = _sq_dists(x[r0:r1], x[c0:c1], x_sq[r0:r1], x_sq[c0:c1])
            if d.shape[1] > k + 1:
                d.partition(k, axis=1)
                d = d[:, : k + 1]
            best = np.concatenate([best, d], axis=1)
            best.partition(k, axis=1)
            best = best[:, : k + 1]
        radii[r0:r1] = best[:, k]
    return radii


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    batch: int = 10000,
    *,
    dtype: DTypeLike = np.float64,
) -> tuple[float, float]:
    """Improved precision and recall, as ADM's ``Evaluator.compute_prec_recall`` with its
    ``ManifoldEstimator(nhood_sizes=(3,), clamp_to_percentile=None)``.

    * Each set's manifold is the union of balls around its points; a point's radius is its
      distance to its k-th nearest neighbour *within its own set, the point itself counting as
      neighbour 0* (ADM partitions full rows of the self-distance matrix, which contain the zero
      self-distance, and reads index k). Duplicated points therefore shrink radii, as in ADM.
    * Distances are squared Euclidean, for radii and queries alike (ADM compares squared
      distances to squared radii); a point is inside a ball when ``d <= r`` (inclusive).
    * precision = share of ``fake`` points inside the ``real`` manifold; recall = share of ``real``
      points inside the ``fake`` manifold. ADM calls it with (reference batch, samples) and
      returns ``(precision, recall)``; so does this.
    * Computation is blocked into (batch, batch) tiles (ADM's row/column batch sizes, default
      10000), so neither 50k x 50k matrix exists at once.

    Precision difference from ADM: ADM casts the features to float16 and computes the distance
    tile in float16 (falling back to float32 only when a tile overflows), then compares in
    float32. This computes in ``dtype`` (float64 by default), which changes only decisions for
    points lying within float16 rounding of a ball's boundary; exact reproduction of ADM's
    float16 rounding is not attempted.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    r = np.asarray(real, dtype=dtype)
    f = np.asarray(fake, dtype=dtype)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must be (N, D) with equal D, got {r.shape} and {f.shape}")
    for name, arr in (("real", r), ("fake", f)):
        if arr.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} points, got {arr.shape[0]}")

    r_sq = np.einsum("ij,ij->i", r, r)
    f_sq = np.einsum("ij,ij->i", f, f)
    r_rad = _knn_radii(r, r_sq, k, batch)
    f_rad = _knn_radii(f, f_sq, k, batch)

    real_in_fake = np.zeros(r.shape[0], dtype=bool)
    fake_in_real = np.zeros(f.shape[0], dtype=bool)
    for r0 in range(0, r.shape[0], batch):
        r1 = min(r0 + batch, r.shape[0])
        for c0 in range(0, f.shape[0], batch):
            c1 = min(c0 + batch, f.shape[0])
            d = _sq_dists(r[r0:r1], f[c0:c1], r_sq[r0:r1], f_sq[c0:c1])
            real_in_fake[r0:r1] |= (d <= f_rad[None, c0:c1]).any(axis=1)
            fake_in_real[c0:c1] |= (d <= r_rad[r0:r1, None]).any(axis=0)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


# --------------------------------------------------------------------------------------------
# Reconstruction metrics: PSNR and SSIM per image
# --------------------------------------------------------------------------------------------


def psnr(a: ArrayLike, b: ArrayLike, data_range: float) -> np.ndarray:
    """Per-image PSNR (N,) of image batches ``a``, ``b`` (N, ...), in dB.

    Same definition as ``skimage.metrics.peak_signal_noise_ratio(a[i], b[i], data_range=...)``
    (which VFMTok's ``vqgan_test.py`` calls on [0, 1] images with range 1): the MSE over all
    pixels and channels of one image, accumulated in float64, and ``10 log10(range^2 / MSE)``.
    Identical images give ``inf``.
    """
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"need equal image batches (N, ...), got {x.shape} and {y.shape}")
    diff = x.astype(np.float64) - y.astype(np.float64)
    mse = np.mean(diff.reshape(x.shape[0], -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


def _box_mean_valid(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every ``win`` x ``win`` window of axes 1 and 2 of (N, H, W, C) that lies fully
    inside the image: shape (N, H - win + 1, W - win + 1, C).

    Separable running-mean box filter along H then W for the whole batch at once (the same
    1-D filter, in the same axis order, that ``scipy.ndimage.uniform_filter`` applies per image
    inside skimage), then cropped to the windows that need no border padding.
    """
    half = win // 2
    y = uniform_filter1d(x, win, axis=1)
    y = uniform_filter1d(y, win, axis=2)
    return y[:, half : x.shape[1] - half, half : x.shape[2] - half]


def ssim(
    a: ArrayLike,
    b: ArrayLike,
    data_range: float,
    *,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    use_sample_covariance: bool = True,
    chunk: int = 8,
) -> np.ndarray:
    """Per-image mean SSIM (N,) of image batches (N, H, W, C) or (N, H, W), vectorised.

    Reproduces ``skimage.metrics.structural_similarity(a[i], b[i], data_range=data_range,
    channel_axis=-1)`` with its defaults: a ``win_size`` x ``win_size`` (7 x 7) uniform window,
    K1 = 0.01, K2 = 0.03, C1 = (K1 R)^2, C2 = (K2 R)^2, sample (N - 1) covariance normalisation,
    the SSIM map averaged over the region left after cropping ``(win_size - 1) // 2`` pixels from
    every border, per channel, then averaged over channels. Because that crop keeps exactly the
    windows lying fully inside the image, border handling never matters. The local moments are
    box-filtered for ``chunk`` images at a time instead of one skimage call per image.

    Computation is in float64. skimage computes float32 inputs in float32, so for float32 images
    the two agree only to about 1e-6; for float64 images they agree to rounding.

    ``data_range`` is the image's dynamic range R. For [0, 1] images the standard value is 1.0.
    Upstream VFMTok (``vqgan_test.py``) calls ``structural_similarity(..., data_range=2.0,
    channel_axis=-1)`` on [0, 1] images, which quadruples C1 and C2 and so inflates SSIM,
    mostly in flat or dark regions; to reproduce its numbers call ``ssim(a, b, data_range=2.0)``,
    and report it next to the standard ``data_range=1.0`` value, labelled as upstream's variant.
    """
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 3:
        x, y = x[..., None], y[..., None]
    if x.ndim != 4:
        raise ValueError(f"need (N, H, W, C) or (N, H, W) images, got shape {np.shape(a)}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError("win_size must be odd and positive")
    if min(x.shape[1], x.shape[2]) < win_size:
        raise ValueError(f"images ({x.shape[1]}x{x.shape[2]}) are smaller than the window {win_size}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")

    npix = win_size * win_size
    cov_norm = npix / (npix - 1.0) if use_sample_covariance else 1.0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].astype(np.float64)
        ys = y[s : s + chunk].astype(np.float64)
        ux = _box_mean_valid(xs, win_size)
        uy = _box_mean_valid(ys, win_size)
        vx = cov_norm * (_box_mean_valid(xs * xs, win_size) - ux * ux)
        vy = cov_norm * (_box_mean_valid(ys * ys, win_size) - uy * uy)
        vxy = cov_norm * (_box_mean_valid(xs * ys, win_size) - ux * uy)
        num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
        den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
        smap = num / den
        # mean over the cropped map of each channel, then over channels, as skimage does
        out[s : s + chunk] = smap.mean(axis=(1, 2)).mean(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Codebook statistics
# --------------------------------------------------------------------------------------------


def _code_counts(codes: ArrayLike, codebook_size: int) -> np.ndarray:
    c = np.asarray(codes).ravel()
    if codebook_size < 1:
        raise ValueError("codebook_size must be >= 1")
    if c.size == 0:
        raise ValueError("no codes given")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {c.dtype}")
    if c.min() < 0 or c.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{c.min()}, {c.max()}]")
    return np.bincount(c.astype(np.int64), minlength=codebook_size)


def codebook_usage(codes: ArrayLike, codebook_size: int) -> float:
    """Fraction of the codebook that occurs in ``codes`` (any shape): distinct codes / size.

    This is VFMTok ``vqgan_test.py``'s "codebook usage" (unique indices / 16384).
    """
    return float(np.count_nonzero(_code_counts(codes, codebook_size)) / codebook_size)


def codebook_perplexity(codes: ArrayLike, codebook_size: int) -> float:
    """exp of the entropy (natural log) of the empirical code distribution.

    Complements usage: it is the effective number of equally used codes, so a codebook where
    every code occurs but a few dominate scores far below ``codebook_size``. Ranges from 1 (one
    code) to ``codebook_size`` (all codes equally often).
    """
    counts = _code_counts(codes, codebook_size)
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-float(np.sum(p * np.log(p)))))
