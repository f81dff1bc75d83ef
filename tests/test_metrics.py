"""vfmtok_core.metrics against independent computations: closed forms, hand-enumerated examples,
brute-force references written here, and scikit-image for PSNR/SSIM."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vfmtok_core import metrics
from vfmtok_core.metrics import (
    FRECHET_METHODS,
    FeatureStats,
    codebook_perplexity,
    codebook_usage,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)


def _direct_fid(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(root)))


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- FeatureStats / Frechet distance


def test_feature_stats_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(50, 4)).astype(np.float32) * 3 + 1
    st = FeatureStats.from_activations(acts)
    x = acts.astype(np.float64)
    centred = x - x.sum(0) / len(x)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    np.testing.assert_allclose(st.mu, x.sum(0) / len(x), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_fid_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(FeatureStats(mu1, np.diag(s1)), FeatureStats(mu2, np.diag(s2)), method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_fid_full_covariance_matches_direct_sqrtm(method):
    rng = np.random.default_rng(2)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    got = frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2), method=method)
    assert got == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-9)
    # symmetric in exact arithmetic; the method form is the same function
    assert FeatureStats(mu2, s2).frechet_distance(FeatureStats(mu1, s1), method=method) == pytest.approx(got, rel=1e-8)


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_fid_identical_stats_is_zero(method):
    rng = np.random.default_rng(3)
    st = FeatureStats(rng.normal(size=10), _random_spd(rng, 10))
    assert abs(frechet_distance(st, st, method=method)) < 1e-8


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_fid_from_samples_approaches_analytic(method):
    rng = np.random.default_rng(4)
    d = 3
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    s1 = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    s2 = np.diag([2.0, 0.5, 1.0])
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    got = frechet_distance(FeatureStats.from_activations(a), FeatureStats.from_activations(b), method=method)
    analytic = _direct_fid(mu1, s1, mu2, s2)
    assert analytic > 1.0
    assert got == pytest.approx(analytic, abs=0.03)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_non_finite_sqrtm_retries_with_eps_offset():
    # A covariance product whose square root does not exist (a nilpotent Jordan block):
    # sqrtm returns inf, and ADM retries with eps on both diagonals.
    s1 = np.array([[1.0, 0.0], [0.0, 0.0]])
    s2 = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert not np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()
    eps = 1e-6
    off = eps * np.eye(2)
    root = np.real(scipy.linalg.sqrtm((s1 + off) @ (s2 + off)))
    mu = np.array([0.5, -0.5])
    expected = float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    with pytest.warns(RuntimeWarning, match="not finite"):
        got = frechet_distance(FeatureStats(mu, s1), FeatureStats(np.zeros(2), s2), eps=eps, method="sqrtm")
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_eps_path_on_realistic_stats(monkeypatch):
    # Force the first sqrtm to fail as it does on near-singular Inception covariances and check
    # the retry uses (S1 + eps I)(S2 + eps I) while the traces stay unmodified.
    rng = np.random.default_rng(5)
    d, eps = 5, 1e-2
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    calls = []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else scipy.linalg.sqrtm(m)

    monkeypatch.setattr(metrics, "sqrtm", flaky)
    with pytest.warns(RuntimeWarning):
        got = frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2), eps=eps, method="sqrtm")
    off = eps * np.eye(d)
    root = np.real(scipy.linalg.sqrtm((s1 + off) @ (s2 + off)))
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert len(calls) == 2
    assert got == pytest.approx(expected, rel=1e-10)
    assert abs(got - _direct_fid(mu1, s1, mu2, s2)) > 1e-3  # the offset really changed the root


@pytest.mark.parametrize("imag, raises", [(5e-4, False), (2e-3, True)])
def test_fid_imaginary_tolerance_on_diagonal(monkeypatch, imag, raises):
    rng = np.random.default_rng(6)
    d = 4
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)

    def complex_root(m):
        r = scipy.linalg.sqrtm(m).astype(np.complex128)
        r += 1j * imag * np.eye(d)
        r[0, 1] += 0.5j  # off-diagonal imaginary parts are not checked by ADM
        return r

    monkeypatch.setattr(metrics, "sqrtm", complex_root)
    if raises:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2), method="sqrtm")
    else:
        got = frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2), method="sqrtm")
        assert got == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-9)


def test_fid_genuinely_complex_root_raises():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(FeatureStats(np.zeros(2), np.eye(2)), FeatureStats(np.zeros(2), -np.eye(2)), method="sqrtm")


# ---------------------------------------------------------------------------- Inception score


def _confident_logits(labels, k, margin=50.0):
    z = np.zeros((len(labels), k))
    z[np.arange(len(labels)), labels] = margin
    return z


def _is_reference(probs, split_size):
    # textbook per-split IS written out element by element
    scores = []
    for s in range(0, len(probs), split_size):
        part = probs[s : s + split_size]
        marg = part.mean(0)
        kl = [sum(p[j] * math.log(p[j] / marg[j]) for j in range(len(p)) if p[j] > 0) for p in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    return sum(scores) / len(scores)


def test_is_balanced_confident_classes_equals_k():
    k = 10
    logits = _confident_logits(np.arange(1000) % k, k)
    assert inception_score(logits, split_size=500) == pytest.approx(k, abs=1e-3)


def test_is_single_class_and_uniform_logits_are_one():
    assert inception_score(_confident_logits(np.full(300, 4), 8)) == pytest.approx(1.0, abs=1e-9)
    assert inception_score(np.zeros((300, 8))) == pytest.approx(1.0, abs=1e-12)
    # logits shifted per row by a constant are the same predictions (softmax invariance)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(40, 6))
    assert inception_score(z + rng.normal(size=(40, 1)) * 100) == pytest.approx(inception_score(z), rel=1e-9)


def test_is_last_partial_split_counts_as_its_own_split():
    # ADM: splits start at 0, split_size, ...; the trailing chunk is a split of its own with the
    # same weight, and the mean (no std) is returned. 5001 samples over 10 balanced classes:
    # split 1 scores 10, the 1-sample split scores exactly 1, so IS = (10 + 1) / 2.
    k = 10
    logits = _confident_logits(np.arange(5001) % k, k)
    got = inception_score(logits, split_size=5000)
    assert isinstance(got, float)
    assert got == pytest.approx(5.5, abs=1e-3)
    # 10 samples in splits of 4: two balanced 4-class splits (score 4) and a 2-sample split of
    # classes 0 and 1 (score 2): (4 + 4 + 2) / 3. Dropping the partial split would give 4, a
    # sample-weighted mean (4*4 + 4*4 + 2*2) / 10 = 3.6.
    assert inception_score(_confident_logits(np.arange(10) % 4, 4), split_size=4) == pytest.approx(
        10 / 3, abs=1e-3
    )


def test_is_matches_reference_on_random_logits():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(37, 5)) * 2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert inception_score(z, split_size=10) == pytest.approx(_is_reference(p, 10), rel=1e-10)


def test_is_survives_underflowing_probabilities():
    z = _confident_logits(np.arange(20) % 4, 4, margin=2000.0)  # exp(-2000) == 0 in float64
    assert inception_score(z) == pytest.approx(4.0, rel=1e-12)


# -------------------------------------------------------------------------- precision / recall


def _brute_force_pr(real, fake, k):
    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]  # column 0 is the point itself

    d = cdist(real, fake, "sqeuclidean")
    precision = np.mean(np.any(d <= radii(real)[:, None], axis=0))
    recall = np.mean(np.any(d <= radii(fake)[None, :], axis=1))
    return precision, recall


def test_pr_disjoint_manifolds():
    rng = np.random.default_rng(9)
    real = rng.normal(scale=0.1, size=(60, 4))
    fake = rng.normal(scale=0.1, size=(50, 4)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_pr_identical_sets():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(40, 5))
    assert precision_recall(x, x.copy(), batch=7) == (1.0, 1.0)


def test_pr_mode_dropping_by_hand():
    # Real: 0, 1, ..., 9 on a line; fake: the cluster 0..4. With k = 3 and the point itself as
    # neighbour 0, fake radii (squared) are 9, 4, 4, 4, 9. Fake 0 covers [-3, 3], fake 4 covers
    # [1, 7], so reals 0..7 are covered: recall = 8/10. Every fake coincides with a real point,
    # so precision = 1.
    real = np.arange(10, dtype=np.float64)[:, None]
    fake = np.arange(5, dtype=np.float64)[:, None]
    assert precision_recall(real, fake, k=3) == (1.0, 0.8)
    assert precision_recall(real, fake, k=3, batch=2) == (1.0, 0.8)
    # Swapped roles: the balls of 0..4 (radii above) cover [-3, 7], so fakes 0..7 of 0..9 are in
    # the real manifold (precision 0.8), and every real point coincides with a fake (recall 1).
    assert precision_recall(fake, real, k=3) == (0.8, 1.0)


def test_pr_outlier_lowers_precision_by_hand():
    # Real radii on 0..9 with k = 3 are at most 3^2 (the end points), so the real manifold is
    # [-3, 12]: of the fakes 0, 20, 21, 22 only 0 is inside -> precision 1/4.
    real = np.arange(10, dtype=np.float64)[:, None]
    fake = np.array([[0.0], [20.0], [21.0], [22.0]])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.25
    # fake 0's 3rd neighbour among {0, 20, 21, 22} is 22, radius 22^2: it covers every real point
    assert recall == 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_pr_batched_equals_brute_force(k):
    rng = np.random.default_rng(11 + k)
    real = rng.normal(size=(53, 3))
    fake = rng.normal(size=(41, 3)) * 0.6 + 1.2
    expected = _brute_force_pr(real, fake, k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    for batch in (7, 10, 1000):
        got = precision_recall(real, fake, k=k, batch=batch)
        assert got == pytest.approx(expected, abs=0.0)


def test_pr_needs_more_points_than_k():
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


# ------------------------------------------------------------------------------ PSNR and SSIM


def _smooth_and_noisy(rng, n=3, h=24, w=20):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [0.5 + 0.4 * np.sin(xx / 3.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], axis=-1
    )
    clean = np.stack([base * (0.6 + 0.2 * i) + 0.05 * i for i in range(n)])
    noisy = np.clip(clean + rng.normal(scale=0.05, size=clean.shape), 0, 1)
    return clean, noisy


def _image_pairs():
    rng = np.random.default_rng(12)
    rand_a, rand_b = rng.uniform(size=(2, 4, 16, 19, 3))
    clean, noisy = _smooth_and_noisy(rng)
    flat = np.full((1, 9, 9, 3), 0.25)
    return [(rand_a, rand_b), (clean, noisy), (clean, clean * 0.9 + 0.05), (flat, flat + 0.01)]


def test_psnr_matches_skimage():
    for a, b in _image_pairs():
        for dr in (1.0, 2.0):
            got = psnr(a, b, data_range=dr)
            ref = [peak_signal_noise_ratio(x, y, data_range=dr) for x, y in zip(a, b)]
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3))
    assert np.all(np.isinf(psnr(x, x, 1.0)))


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(data_range):
    for a, b in _image_pairs():
        got = ssim(a, b, data_range=data_range, chunk=2)
        ref = [structural_similarity(x, y, data_range=data_range, channel_axis=-1) for x, y in zip(a, b)]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


def test_ssim_float32_inputs_close_to_skimage():
    # skimage computes float32 images in float32; this module always uses float64
    a, b = (x.astype(np.float32) for x in _image_pairs()[1])
    got = ssim(a, b, data_range=1.0)
    ref = [structural_similarity(x, y, data_range=1.0, channel_axis=-1) for x, y in zip(a, b)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_ssim_options_match_skimage():
    a, b = _image_pairs()[1]
    got = ssim(a, b, data_range=1.0, win_size=5, use_sample_covariance=False, k1=0.02, k2=0.05)
    ref = [
        structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=5,
                              use_sample_covariance=False, K1=0.02, K2=0.05)
        for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    gray = ssim(a[..., 0], b[..., 0], data_range=1.0)
    ref_gray = [structural_similarity(x, y, data_range=1.0) for x, y in zip(a[..., 0], b[..., 0])]
    np.testing.assert_allclose(gray, ref_gray, rtol=0, atol=1e-9)


def test_ssim_upstream_variant_is_higher_and_identical_is_one():
    a, b = _image_pairs()[1]
    assert np.all(ssim(a, b, data_range=2.0) > ssim(a, b, data_range=1.0))
    np.testing.assert_allclose(ssim(a, a, data_range=1.0), 1.0, atol=1e-12)


# -------------------------------------------------------------------------------- codebook


def test_codebook_usage_and_perplexity():
    size = 16
    uniform = np.tile(np.arange(size), 5).reshape(4, -1)
    assert codebook_usage(uniform, size) == 1.0
    assert codebook_perplexity(uniform, size) == pytest.approx(size, rel=1e-12)
    single = np.full((3, 7), 5)
    assert codebook_usage(single, size) == 1 / size
    assert codebook_perplexity(single, size) == pytest.approx(1.0, abs=1e-12)
    # 4 of 16 codes used, with counts 3, 1, 3, 1 -> entropy by hand
    codes = np.array([0, 0, 0, 1, 2, 2, 2, 3])
    p = np.array([3, 1, 3, 1]) / 8
    assert codebook_usage(codes, size) == 4 / size
    assert codebook_perplexity(codes, size) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    with pytest.raises(ValueError):
        codebook_usage(np.array([0, size]), size)


def test_fid_methods_agree_on_inception_sized_statistics():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((600, 256)), rng.standard_normal((600, 256)) * 1.1 + 0.05
    fa, fb = FeatureStats.from_activations(a), FeatureStats.from_activations(b)
    assert frechet_distance(fa, fb, method="eigh") == pytest.approx(frechet_distance(fa, fb, method="sqrtm"), rel=1e-9)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(fa, fb, method="svd")
