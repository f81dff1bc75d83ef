"""fsspec helpers: one filesystem per URL, and writes that appear whole or not at all.

Atomicity: on a local (or any POSIX-like) filesystem a file is written under a temporary name in
the same folder and renamed into place; on object stores a single PUT is already atomic (the
object is either absent or complete), so the bytes are uploaded in one request.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = ".tmp-"


def filesystem(url: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") if path != "/" else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never observe a partial file."""
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj) -> None:
    atomic_write(fs, path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete temporary files a killed writer left behind (local filesystems only)."""
    if not is_local(fs) or not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm_file(p)
    return len(stale)
