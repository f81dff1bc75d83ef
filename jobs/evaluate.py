"""Score generated samples as the ADM evaluator does: FID, sFID, Inception Score, precision, recall.

``python -m jobs.evaluate SAMPLES.npz REF.npz --inception weights-inception-2015-12-05-6726825d.pth``

Both files are ADM sample batches (``arr_0`` uint8 N x H x W x 3). A reference batch may carry its
statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, as ADM's ``VIRTUAL_imagenet256_labeled.npz``
does): FID and sFID then use them, and its images serve precision and recall. A reference's
activations and statistics are cached (``--cache-dir``), keyed by the file's location, size and
version and by the network's weights, so scoring many sample batches against one reference computes
it once and reads only its small statistics after that.

The network is our port of the TF graph ADM runs (:mod:`vfmtok_core.inception`, loading
torch-fidelity's weights file, and checked against torch-fidelity's network); nothing downloads. The
figures follow ADM's definitions (:mod:`vfmtok_core.metrics`). How close they come to ADM's
TensorFlow evaluator: torch-fidelity documents its port, TF1's bilinear resize included, as matching
the TF reference up to float precision (pytorch-fid, which resizes differently, reports 0.08 absolute
FID error on LSUN), so what remains is float summation order, plus precision/recall distances
computed at a higher precision than ADM's float16. TensorFlow cannot run here to measure it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jobs.cli import UsageError, fail, parse_config, setup_logging, storage_options
from pipelines.contract.redact import redact_url
from pipelines.contract.sample_batch import array_shape, iter_array
from pipelines.contract.storage import atomic_write, exists, filesystem
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.inception import InceptionV3
from vfmtok_core.metrics import FRECHET_METHODS, FeatureStats, frechet_distance, inception_score, precision_recall

log = logging.getLogger("jobs.evaluate")

REFERENCE_STATS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class EvaluateConfig:
    """Score an ADM sample batch against a reference batch: FID, sFID, IS, precision, recall."""

    samples: str = field(metadata={"help": "the samples' .npz (arr_0 uint8 NHWC)", "positional": True})
    reference: str = field(metadata={"help": "the reference .npz (arr_0, optionally mu/sigma/mu_s/sigma_s)", "positional": True})
    inception: str = field(default="", metadata={"help": "Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth; path or URL; required)"})
    out: str | None = field(default=None, metadata={"help": "write the JSON report here too"})
    batch_size: int = field(default=64, metadata={"help": "images per Inception forward (ADM: 64)"})
    fid_method: str = field(default="eigh", metadata={"help": "the root's trace in FID: eigh (same value, several times faster) or sqrtm (ADM's arithmetic, to the last digit)", "choices": list(FRECHET_METHODS)})
    cache_dir: str | None = field(default=None, metadata={"help": "reference statistics cache (default: $VFMTOK_CACHE_DIR/eval or ~/.cache/vfmtok/eval)"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})
    storage_options: str = field(default="{}", metadata={"help": "fsspec options for URLs: JSON, or @FILE holding JSON"})


@dataclass
class Activations:
    """What the metrics need from a batch of images."""

    pool: np.ndarray  # (N, 2048) float32
    spatial: np.ndarray  # (N, 2023) float32
    logits: np.ndarray  # (N, 1008) float32

    @staticmethod
    def concat(parts: list[dict[str, np.ndarray]]) -> "Activations":
        return Activations(*(np.concatenate([p[k] for p in parts]) for k in ("pool", "spatial", "logits")))


def activations(net: InceptionV3, batches: Iterable[np.ndarray], device: str, total: int | None = None,
                desc: str = "inception") -> Activations:
    """Inception outputs for uint8 NHWC image batches."""
    parts = []
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for batch in batches:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()
            out = net(x)
            parts.append({k: v.float().cpu().numpy() for k, v in out.items()})
            bar.update(len(batch))
    return Activations.concat(parts)


def file_identity(url: str, storage_options: Mapping | None) -> str:
    """A hash of the file's location, size and version: what the cache is keyed by. The version is
    its ETag (or VersionId) on an object store, its git blob id on Hugging Face, its modification
    time on a disk: a file rewritten in place gets a new one, so its statistics are computed again.
    A store that reports no version gets the content hashed. Hashing the content every time meant
    reading the whole reference (1.4 GB for ADM's ImageNet batch, a download on S3) on every run."""
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    version = {k: str(info[k]) for k in ("ETag", "etag", "VersionId", "blob_id", "mtime", "LastModified") if info.get(k) is not None}
    h = hashlib.sha256(json.dumps({"url": redact_url(url), "size": info.get("size"), **version}, sort_keys=True).encode())
    if not version:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def network_id(net: InceptionV3) -> str:
    """A hash of the network's weights: cached statistics of another network are never reused."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_root(cfg_dir: str | None) -> Path:
    if cfg_dir:
        return Path(cfg_dir)
    base = os.environ.get("VFMTOK_CACHE_DIR")
    return Path(base) / "eval" if base else Path.home() / ".cache" / "vfmtok" / "eval"


@dataclass
class Reference:
    pool: np.ndarray  # the reference images' pool features (precision and recall)
    fid: FeatureStats
    sfid: FeatureStats
    precomputed: bool  # FID/sFID statistics came with the file


def reference(cfg: EvaluateConfig, net: InceptionV3, net_id: str, so: Mapping | None) -> Reference:
    """The reference's activations and statistics, from the cache when this file and network were
    seen before."""
    cache = _cache_root(cfg.cache_dir) / f"{file_identity(cfg.reference, so)[:24]}-{net_id}.npz"
    fs, path = filesystem(cfg.reference, so)
    with fs.open(path, "rb") as f:
        npz = np.load(f)  # members are read on access: only the small statistics are read here
        given = {k: npz[k] for k in REFERENCE_STATS} if set(REFERENCE_STATS) <= set(npz.files) else {}
    if exists(*filesystem(str(cache))):
        log.info("reference statistics from the cache (%s)", cache)
        data = dict(np.load(cache))
    else:
        n = array_shape(cfg.reference, "arr_0", so)[0]
        acts = activations(net, iter_array(cfg.reference, "arr_0", cfg.batch_size, so), cfg.device, n, "reference")
        data = {"pool": acts.pool}
        for key, feats in (("", acts.pool), ("_s", acts.spatial)):
            stats = FeatureStats.from_activations(feats)
            data[f"mu{key}"], data[f"sigma{key}"] = stats.mu, stats.sigma
        buf = io.BytesIO()
        np.savez(buf, **data)
        atomic_write(*filesystem(str(cache)), buf.getvalue())
    data.update(given)  # statistics that come with the file win over computed ones
    return Reference(data["pool"], FeatureStats(data["mu"], data["sigma"]), FeatureStats(data["mu_s"], data["sigma_s"]),
                     bool(given))


def generation_metrics(samples: Activations, ref: Reference, fid_method: str = "eigh") -> dict:
    precision, recall = precision_recall(ref.pool, samples.pool)
    return {
        "fid": frechet_distance(FeatureStats.from_activations(samples.pool), ref.fid, method=fid_method),
        "sfid": frechet_distance(FeatureStats.from_activations(samples.spatial), ref.sfid, method=fid_method),
        "inception_score": inception_score(samples.logits),
        "precision": precision,
        "recall": recall,
    }


def load_inception(url: str, device: str, so: Mapping | None) -> InceptionV3:
    if not url:
        raise UsageError("--inception is required: the Inception weights file (nothing is downloaded)")
    return InceptionV3.from_file(url, so).to(device).eval()


def run(cfg: EvaluateConfig) -> dict:
    so = storage_options(cfg.storage_options)
    for what, url in (("samples", cfg.samples), ("reference", cfg.reference)):
        if not exists(*filesystem(url, so)):
            raise UsageError(f"{what} file {url} does not exist")
    net = load_inception(cfg.inception, cfg.device, so)
    net_id = network_id(net)
    ref = reference(cfg, net, net_id, so)
    n = array_shape(cfg.samples, "arr_0", so)[0]
    samples = activations(net, iter_array(cfg.samples, "arr_0", cfg.batch_size, so), cfg.device, n, "samples")
    report = {**generation_metrics(samples, ref, cfg.fid_method), "fid_method": cfg.fid_method, "samples": n, "reference_images": len(ref.pool),
              "reference_statistics": "from the file" if ref.precomputed else "computed",
              "inception": net_id}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_config(EvaluateConfig, argv, description=__doc__)
    try:
        report = run(cfg)
    except (UsageError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        fail(e)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
