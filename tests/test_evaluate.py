"""End to end on this CPU: sample -> .npz -> jobs.evaluate, and a tokenizer -> jobs.evaluate_tokenizer,
with random-weight models and a random-weight Inception file; the reports checked against figures
computed here from the same network by other means."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from jobs.evaluate import EvaluateConfig, file_identity
from jobs.evaluate import run as evaluate
from jobs.evaluate_tokenizer import EvaluateTokenizerConfig
from jobs.evaluate_tokenizer import run as evaluate_tokenizer
from jobs.sample import SampleConfig
from jobs.sample import run as sample
from jobs.tokenize import TokenizeConfig
from jobs.tokenize import run as tokenize
from pipelines.producer.samples import bundled_photos
from tests.test_inception import random_state
from vfmtok_core import VFMTokenizer
from vfmtok_core.inception import InceptionV3
from vfmtok_core.preprocess import center_crop, to_tensor, to_uint8


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """Random weights that keep activations at a steady scale, so features tell images apart."""
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(random_state(0), path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, img in bundled_photos():
        img.thumbnail((160, 160))
        img.save(root / f"{name}.png")
    return root


def _pool(inception: str, images: np.ndarray) -> np.ndarray:
    net = InceptionV3.from_file(inception).eval()
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).float())["pool"].numpy().astype(np.float64)


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID computed another way than vfmtok_core.metrics: with few samples (n << 2048) the
    covariances are ``A'A/(n-1)`` and ``B'B/(n-1)`` for the centred activations, and the nonzero
    eigenvalues of their product are those of the n x n matrix ``(AB')(BA')/(n-1)^2``."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = ca @ cb.T / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_root = np.sqrt(np.clip(scipy.linalg.eigvals(cross @ cross.T).real, 0, None)).sum()
    traces = (ca**2).sum() / (len(a) - 1) + (cb**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * trace_root)


def test_sample_then_evaluate(tmp_path, inception, photos, caplog):
    samples = sample(SampleConfig(out=str(tmp_path / "s.npz"), num=12, batch_size=6, image_size=64, seed=1))
    real = np.stack([np.asarray(center_crop(Image.open(p).convert("RGB"), 64)) for p in sorted(photos.iterdir())] * 2)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    cfg = EvaluateConfig(str(samples), str(tmp_path / "ref.npz"), inception=inception, cache_dir=str(tmp_path / "cache"),
                         batch_size=5, out=str(tmp_path / "report.json"))
    report = evaluate(cfg)
    assert report["samples"] == 12 and report["reference_images"] == 12
    assert report["reference_statistics"] == "computed"
    fake = _pool(inception, np.load(samples)["arr_0"])
    assert report["fid"] == pytest.approx(_fid(fake, _pool(inception, real)), rel=1e-3)
    assert report["inception_score"] >= 1.0 and 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert json.loads((tmp_path / "report.json").read_text()) == report
    # The reference is computed once: the second run reads the cache and reports the same.
    with caplog.at_level("INFO", logger="jobs.evaluate"):
        assert evaluate(cfg) == report
    assert "from the cache" in caplog.text
    # A reference rewritten in place (same name and size, other images) is computed again.
    caplog.clear()
    np.savez(tmp_path / "ref.npz", arr_0=255 - real)
    with caplog.at_level("INFO", logger="jobs.evaluate"):
        assert evaluate(cfg)["fid"] == pytest.approx(_fid(fake, _pool(inception, 255 - real)), rel=1e-3)
    assert "from the cache" not in caplog.text
    np.savez(tmp_path / "ref.npz", arr_0=real)
    # A batch scored against itself: FID ~ 0, every point inside the other's manifold.
    same = evaluate(EvaluateConfig(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), inception=inception,
                                   cache_dir=str(tmp_path / "cache")))
    # (Not exactly 0: 12 samples in 2048 dimensions leave ~2000 zero eigenvalues, whose float
    # noise the square root magnifies; 50k samples do not.)
    assert abs(same["fid"]) < 1e-5 * report["fid"] and same["precision"] == same["recall"] == 1.0


def test_cache_key_follows_the_version_on_s3(s3_bucket, tmp_path, monkeypatch):
    # On a store the key comes from the object's metadata, never its bytes (the object is not
    # opened): the same object gives the same key, an object rewritten in place (same name, same
    # size) another.
    import fsspec
    import s3fs

    def no_reads(*args, **kwargs):
        raise AssertionError("the reference was opened to compute its cache key")

    monkeypatch.setattr(s3fs.S3FileSystem, "open", no_reads)
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **so)
    url = f"s3://{bucket}/ref.npz"
    fs.pipe_file(f"{bucket}/ref.npz", b"a" * 100)
    first = file_identity(url, so)
    assert file_identity(url, so) == first
    fs.pipe_file(f"{bucket}/ref.npz", b"b" * 100)
    assert file_identity(url, so) != first
    (tmp_path / "ref.npz").write_bytes(b"a" * 100)  # a local file: its path and mtime, not S3's key
    assert file_identity(str(tmp_path / "ref.npz"), None) != first


def test_reference_statistics_in_the_file_are_used(tmp_path, inception, photos):
    real = np.stack([np.asarray(center_crop(Image.open(p).convert("RGB"), 64)) for p in sorted(photos.iterdir())] * 2)
    other = real[:, ::-1].copy()  # the statistics of another set, stored as ADM's reference batches store them
    pool = _pool(inception, other)
    net = InceptionV3.from_file(inception).eval()
    with torch.no_grad():
        spatial = net(torch.from_numpy(other).permute(0, 3, 1, 2).float())["spatial"].numpy().astype(np.float64)
    np.savez(tmp_path / "ref.npz", arr_0=real, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    np.savez(tmp_path / "s.npz", arr_0=real)
    report = evaluate(EvaluateConfig(str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), inception=inception,
                                     cache_dir=str(tmp_path / "cache")))
    assert report["reference_statistics"] == "from the file"
    assert report["fid"] == pytest.approx(_fid(_pool(inception, real), pool), rel=1e-3) and report["fid"] > 1e-3
    assert report["precision"] == report["recall"] == 1.0  # the images themselves are the same set


@pytest.fixture(scope="module")
def data(tmp_path_factory, photos):
    """The photos and one file that is not an image."""
    import shutil

    root = tmp_path_factory.mktemp("data")
    for p in photos.iterdir():
        shutil.copy(p, root / p.name)
    (root / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, str]:
    """The seed-0 tiny tokenizer as released files are laid out: ``ema`` without the backbone, and
    the backbone's own .pth."""
    root = tmp_path_factory.mktemp("tok")
    state = VFMTokenizer.from_config("tiny", seed=0).state_dict()
    torch.save({"ema": {k: v for k, v in state.items() if not k.startswith("dinov2.")}}, root / "tok.pt")
    torch.save({k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}, root / "dinov2.pth")
    return {"tokenizer": str(root / "tok.pt"), "dinov2": str(root / "dinov2.pth")}


def test_evaluate_tokenizer_direct_from_tokens_and_on_ray(tmp_path, inception, photos, data, tokenizer_files):
    base = dict(data=str(data), inception=inception, config="tiny", batch_size=4, size=64, **tokenizer_files)
    direct = evaluate_tokenizer(EvaluateTokenizerConfig(out=str(tmp_path / "direct"), **base))
    assert direct["images"] == 6 and direct["rejected"] == 1
    assert 0 < direct["codebook_usage"] <= 1 and direct["codebook_perplexity"] >= 1
    assert direct["ssim_upstream"] > direct["ssim"]  # upstream's data_range of 2 on [0, 1] images inflates it
    assert np.isfinite(direct["rfid"]) and direct["ris"] >= 1
    # One image's PSNR computed here by other means: reconstruct, uint8 as upstream, PIL bicubic to 64, skimage.
    tok = VFMTokenizer.from_config("tiny", seed=0)
    name = sorted(photos.iterdir())[0]  # the same file as in data
    crop = np.asarray(center_crop(Image.open(name).convert("RGB"), 112))
    recon = to_uint8(tok.decode(tok.encode(to_tensor(crop[None]))))[0]
    small = [np.asarray(Image.fromarray(a).resize((64, 64), Image.BICUBIC)) / 255.0 for a in (crop, recon)]
    lines = [json.loads(line) for line in (tmp_path / "direct" / "per_image.jsonl").read_text().splitlines()]
    mine = next(rec for rec in lines if rec["key"] == name.stem)
    # (Decoded alone here, in a batch of 4 there: float rounding may move a pixel by one level.)
    assert mine["psnr"] == pytest.approx(peak_signal_noise_ratio(small[0], small[1], data_range=1.0), rel=1e-4)
    assert Image.open(tmp_path / "direct" / "best_worst.png").size == (6 * 64, 2 * 64)

    tokenize(TokenizeConfig(input=str(data), output=str(tmp_path / "tok"), config="tiny", workers=1, **tokenizer_files))
    from_tokens = evaluate_tokenizer(EvaluateTokenizerConfig(out=str(tmp_path / "t"), tokens=str(tmp_path / "tok"), **base))
    assert from_tokens["codes_from"] == str(tmp_path / "tok")
    assert from_tokens["rejected"] == 0  # the tokenization job rejected the broken file: it has no codes
    _same_report({**from_tokens, "rejected": 1}, direct)
    _same_report(evaluate_tokenizer(EvaluateTokenizerConfig(out=str(tmp_path / "r"), workers=2, **base)), direct)


def _same_report(got: dict, expected: dict) -> None:
    """Equal reports: the same images and codes exactly; the measured figures to float noise (the
    decoder's rounding depends on how images are batched, which moves a pixel by one level here
    and there, and CPU convolutions can round differently between runs)."""
    loose = {"rfid", "ris", "psnr", "ssim", "ssim_upstream"}
    assert {k: v for k, v in got.items() if k not in loose | {"codes_from"}} == \
        {k: v for k, v in expected.items() if k not in loose | {"codes_from"}}
    assert all(got[k] == pytest.approx(expected[k], rel=1e-4) for k in loose)


@pytest.mark.parametrize("module, args, message", [
    ("jobs.evaluate", ["/nonexistent/samples.npz", "/nonexistent/ref.npz", "--inception", "x.pth"], "does not exist"),
    ("jobs.evaluate_tokenizer", ["--data", "/nonexistent/images"], "--data and --inception are required"),
])
def test_user_mistakes_are_one_line_and_exit_2(module, args, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", module, *args], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr


def test_evaluate_tokenizer_on_torchrun_ranks(tmp_path, inception, data):
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = dict(data=str(data), inception=inception, config="tiny", batch_size=2, size=64)
    direct = evaluate_tokenizer(EvaluateTokenizerConfig(out=str(tmp_path / "direct"), **base))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()] + ["--out", str(tmp_path / "ranks")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "-m", "jobs.evaluate_tokenizer",
                           *args], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_report(json.loads((tmp_path / "ranks" / "report.json").read_text()), direct)
    def keys(run: str) -> list[str]:
        return [json.loads(line)["key"] for line in (tmp_path / run / "per_image.jsonl").read_text().splitlines()]

    assert keys("ranks") == keys("direct")  # the same images, in input order
