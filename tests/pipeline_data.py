"""Builders for small real datasets in every supported input layout (and some broken inputs)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.contract.manifest import write_dataset
from pipelines.contract.shards import ShardRows


def png_bytes(seed: int, size=(60, 40), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_bytes() -> bytes:
    """A tiny PNG whose header claims 12000 x 12000 pixels."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, classes: int = 2, per_class: int = 3) -> list[str]:
    keys = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"class{c}" / f"img{i}.png").write_bytes(png_bytes(c * 100 + i))
            keys.append(f"class{c}/img{i}")
    return keys


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_lmdb(root: Path, records: list[bytes]) -> None:
    import lmdb

    env = lmdb.open(str(root), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"num_samples", str(len(records)).encode())
        for i, rec in enumerate(records):
            txn.put(str(i).encode(), rec)
    env.close()


def lmdb_record(image: bytes, label: int) -> bytes:
    return pickle.dumps({"image": image, "label": label})


class Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_token_dataset(
    root: Path, shards: int = 7, rows: int = 13, variants: int = 2, fingerprint: str = "tiny-abc", fmt: str = "parquet",
    labelled: bool = True,
) -> list[str]:
    """A token dataset with known contents: token value = sample number * 10 + variant (mod 1024);
    labels sample number mod 5, or -1 (none) when not ``labelled``."""
    parts, keys = [], []
    n = 0
    for s in range(shards):
        count = rows + (s % 3)  # ragged shards
        k = [f"img{n + i:05d}" for i in range(count)]
        tok = np.zeros((count, variants, 256), np.uint16)
        for i in range(count):
            for v in range(variants):
                tok[i, v] = ((n + i) * 10 + v) % 1024
        labels = [(n + i) % 5 if labelled else -1 for i in range(count)]
        parts.append(ShardRows(k, labels, ["src"] * count, [bytes(32)] * count, tok))
        keys += k
        n += count
    identity = {"fingerprint": fingerprint, "variants": [f"v{i}" for i in range(variants)], "format": fmt,
                "tokens_per_image": 256}
    write_dataset(str(root), parts, identity, codebook_size=1024)
    return keys
