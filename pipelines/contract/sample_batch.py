"""The ADM evaluator's sample batch: an ``.npz`` holding ``arr_0`` (uint8 images, N x H x W x 3) and
``arr_1`` (int64 labels), built from chunks that a distributed sampler writes one by one.

Chunks are ``<parts>/chunk-NNNNNN.npy``, each written atomically, so a crashed run keeps every
finished chunk and a rerun computes only the missing ones. The ``.npz`` is streamed from them (50,000
samples at 256 px are 9.8 GB, more than a host should hold at once) with fixed zip timestamps, so
equal samples always give equal bytes, whoever computed them.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from pipelines.contract.storage import atomic_write, filesystem, join, read_bytes

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the zip epoch: no clock in the bytes
_CHUNK = re.compile(r"chunk-(\d{6})\.npy")


def parts_url(out: str) -> str:
    """Where the chunks of ``out`` (an .npz URL) live while it is being sampled."""
    return out + ".parts"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.npy"


def write_chunk(parts: str, index: int, images: np.ndarray, storage_options: Mapping | None = None) -> None:
    fs, root = filesystem(parts, storage_options)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
    atomic_write(fs, join(root, chunk_name(index)), buf.getvalue())


def finished_chunks(parts: str, storage_options: Mapping | None = None) -> set[int]:
    """Indices of the chunks already written (none when the folder does not exist yet)."""
    fs, root = filesystem(parts, storage_options)
    if not fs.exists(root):
        return set()
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True) if e["type"] == "file")
    return {int(m.group(1)) for m in map(_CHUNK.fullmatch, names) if m}


def read_chunk(parts: str, index: int, storage_options: Mapping | None = None) -> np.ndarray:
    fs, root = filesystem(parts, storage_options)
    return np.load(io.BytesIO(read_bytes(fs, join(root, chunk_name(index)))), allow_pickle=False)


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, pieces: Iterable[np.ndarray]) -> None:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        written = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=dtype)
            f.write(piece.tobytes())
            written += len(piece)
        if written != shape[0]:
            raise ValueError(f"{name}: wrote {written} rows, the header says {shape[0]}")


def write_sample_batch(out: str, image_shape: tuple[int, int, int], chunks: Iterable[np.ndarray], labels: np.ndarray,
                       storage_options: Mapping | None = None) -> None:
    """Stream ``chunks`` (uint8 (n, H, W, 3) each, in order) and ``labels`` into the ADM ``.npz`` at
    ``out``, uncompressed as ``np.savez`` writes it; readable with ``np.load``."""
    fs, path = filesystem(out, storage_options)
    tmp = f"{path}.writing"
    with fs.open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_member(zf, "arr_0", (len(labels), *image_shape), np.uint8, chunks)
        _write_member(zf, "arr_1", (len(labels),), np.int64, [labels])
    fs.mv(tmp, path)


def _header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def iter_array(path: str, name: str, batch: int, storage_options: Mapping | None = None) -> Iterable[np.ndarray]:
    """The rows of member ``name`` of an ``.npz`` (e.g. ``arr_0``), ``batch`` at a time, read from the
    zip stream: a 50k-image batch is never in memory whole. Compressed or stored members both work."""
    fs, path = filesystem(path, storage_options)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as member:
        shape, fortran, dtype = _header(member)
        if fortran:
            raise ValueError(f"{path}:{name} is stored in Fortran order; expected C order")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = member.read(n * row)
            if len(data) != n * row:
                raise ValueError(f"{path}:{name} ends after {start} of {shape[0]} rows")
            yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


def array_shape(path: str, name: str, storage_options: Mapping | None = None) -> tuple[int, ...]:
    fs, path = filesystem(path, storage_options)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as member:
        return tuple(_header(member)[0])
