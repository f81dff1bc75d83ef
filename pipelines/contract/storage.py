"""fsspec access that an at-scale job can trust: fresh listings, retried requests, verified writes.

- **Fresh**: object-store filesystems are made without fsspec's listing cache. A cached listing is
  what made a resumed S3 job fail: a commit record written after the first listing of its folder
  was "not found" by the same filesystem object later. Nothing here lists a folder twice on a hot
  path, so the cache bought nothing.
- **Retried**: every request goes through :func:`pipelines.contract.retry.retrying` (bounded, backoff with
  jitter, counted); s3fs's and botocore's own silent retries are switched off so that each attempt
  is seen and counted once.
- **Verified writes**: a write returns only once the object is in place whole. Locally: a temporary
  file, fsync, rename, fsync of the folder. On S3: a single PUT (atomic: absent or complete) sent
  with its MD5, which the store checks, and the stored ETag compared with it; larger multipart
  uploads are checked by size. A mismatch is retried as a transient failure.
- **Bounded reads**: whole-object reads take a byte limit, so a hostile or broken input cannot
  make a process hold an arbitrary amount of memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import os
import weakref
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines.contract import presigned
from pipelines.contract.presigned import is_invalid_range
from pipelines.contract.redact import remember
from pipelines.contract.retry import SLOTS, TransientError, retrying, retrying_async

TMP_PREFIX = ".tmp-"
MAX_JSON_BYTES = 1 << 30  # a plan of tens of millions of items still fits; anything larger is refused
_S3_SINGLE_PUT = 100 << 20  # s3fs sends one PUT below twice its 50 MiB chunk size


class TooLarge(ValueError):
    """An object is larger than the caller's limit for it (never retried)."""


def filesystem(url: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a URL or local path; see the module docstring for
    the options forced on object stores."""
    opts = dict(storage_options or {})
    remember(opts)
    remember(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in ("file", "local"):
        opts.setdefault("use_listings_cache", False)
        if protocol in ("s3", "s3a"):
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("retries", {"total_max_attempts": 1})
            opts["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if _is_s3(fs):
        # s3fs's own retry loop is a class attribute, not an option. Instances made with our
        # options (no listing cache) are ours alone in fsspec's instance cache, so this is safe.
        fs.retries = 1
    return fs, path.rstrip("/") if path != "/" else path


def _forget_inherited_sessions() -> None:
    """In a forked child (a DataLoader worker), drop the finalisers of the parent's S3 sessions.

    They share the parent's sockets and belong to the parent's event loop thread, which the child
    does not have: run in the child, a finaliser closes them on whatever loop is current (printing
    "attached to a different loop" tracebacks) and could end connections the parent still uses.
    The child opens sessions of its own (fsspec empties its instance cache in a new process)."""
    for ref, info in list(weakref.finalize._registry.items()):  # noqa: SLF001 - no public way to list them
        if getattr(info.func, "__qualname__", "") == "S3FileSystem.close_session":
            ref.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_sessions)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def call(fs: fsspec.AbstractFileSystem, method: str, *args, **kwargs):
    """``fs.<method>(*args, **kwargs)``, retried on transient errors when ``fs`` is remote."""
    return retrying(getattr(fs, method), *args, what=f"{method} {args[0] if args else ''}", remote=not is_local(fs), **kwargs)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return call(fs, "exists", path)


def find(fs: fsspec.AbstractFileSystem, path: str, **kwargs):
    """A fresh recursive listing (no cache is kept, see the module docstring)."""
    return call(fs, "find", path, **kwargs)


def is_temporary(path: str) -> bool:
    """Whether ``path`` is a local writer's file in progress (see :func:`atomic_write`): a
    listing taken while a writer works can hold one that is gone by the time it is read."""
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(TMP_PREFIX)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never observe a partial file, and return only
    once it is verifiably in place."""
    if is_local(fs):
        _local_write(path, data)
    else:
        retrying(_remote_write, fs, path, data, what=f"write {path}")


def _local_write(path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut only once the folder is synced
    finally:
        os.close(fd)
    if os.path.getsize(path) != len(data):
        raise OSError(f"{path}: wrote {len(data)} bytes but {os.path.getsize(path)} are on disk")


def _remote_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One attempt: upload, then check what the store holds (raises TransientError if it differs)."""
    if _is_s3(fs) and len(data) < _S3_SINGLE_PUT:
        md5 = hashlib.md5(data)
        response = fs.pipe_file(path, data, ContentMD5=base64.b64encode(md5.digest()).decode())
        etag = str((response or {}).get("ETag", "")).strip('"')
        if etag != md5.hexdigest():
            raise TransientError(f"{path}: the store's ETag {etag!r} is not the MD5 of the {len(data)} bytes sent")
        return
    fs.pipe_file(path, data)
    size = fs.info(path)["size"]
    if size != len(data):
        raise TransientError(f"{path}: {size} bytes stored, {len(data)} sent")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, limit: int | None = None) -> bytes:
    """The whole object, in one request on object stores; :class:`TooLarge` past ``limit`` bytes
    (checked without reading more than ``limit + 1`` bytes)."""
    if is_local(fs):
        with open(path, "rb") as f:
            # ``read(n)`` allocates ``n`` bytes before reading: ask for one more than the file holds
            # (a file that grew since is then read on, rarely).
            n = os.fstat(f.fileno()).st_size + 1
            cap = None if limit is None else limit + 1
            data = f.read(n if cap is None else min(n, cap))
            if len(data) == n and (cap is None or n < cap):
                data += f.read() if cap is None else f.read(cap - n)
    else:
        data = retrying(_ranged_get, fs, path, (1 << 62) if limit is None else limit + 1, what=f"read {path}")
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{path} is larger than the {limit}-byte limit for it")
    return data


def _ranged_get(fs: fsspec.AbstractFileSystem, path: str, n: int) -> bytes:
    """At most ``n`` bytes in a single GET (no size lookup first). An empty object answers a
    range request with 416, which means: zero bytes."""
    try:
        return fs.cat_file(path, start=0, end=n)
    except OSError as e:
        if is_invalid_range(e):
            return b""
        raise


def read_many(fs: fsspec.AbstractFileSystem, paths: Iterable[str], limit: int, in_flight: int) -> Iterator[Future]:
    """Whole objects, as :func:`read_bytes` reads them, with up to ``in_flight`` requests open: one
    future per path, in order, each resolving to the bytes or raising what ``read_bytes`` would.

    Requests run ahead of the caller by at most ``in_flight`` objects, so memory stays bounded
    however slowly the caller consumes. On S3 they are presigned GETs on fsspec's event loop where
    :mod:`pipelines.contract.presigned` allows (each holding one of the process's request slots),
    elsewhere ``read_bytes`` calls on threads."""
    reader = presigned.reader_for(fs) if _is_s3(fs) else None
    pool = None if reader is not None else ThreadPoolExecutor(max_workers=in_flight)

    def start(path: str) -> Future:
        if pool is not None:
            return pool.submit(read_bytes, fs, path, limit)
        SLOTS.acquire()
        future = asyncio.run_coroutine_threadsafe(_presigned_read(reader, path, limit), fs.loop)
        future.add_done_callback(lambda _: SLOTS.release())
        return future

    ahead: deque[Future] = deque()
    todo = iter(paths)
    try:
        for path in itertools.islice(todo, in_flight):
            ahead.append(start(path))
        while ahead:
            done = ahead.popleft()
            yield done
            for path in itertools.islice(todo, 1):
                ahead.append(start(path))
    finally:
        for future in ahead:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


async def _presigned_read(reader: presigned.PresignedGet, path: str, limit: int) -> bytes:
    data = await retrying_async(reader.fetch, path, limit + 1, what=f"read {path}")
    if len(data) > limit:
        raise TooLarge(f"{path} is larger than the {limit}-byte limit for it")
    return data


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj) -> None:
    atomic_write(fs, path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str, limit: int = MAX_JSON_BYTES):
    """Parse a JSON file of at most ``limit`` bytes; a malformed one is a ValueError naming it."""
    data = read_bytes(fs, path, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from None


class RemoteReader(io.RawIOBase):
    """A seekable, read-only view of a remote object, fetched in ranged GETs that are each retried:
    a connection that breaks mid-stream costs one block, not the whole object or the work item."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int):
        super().__init__()
        self.fs, self.path, self.size, self.pos = fs, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = retrying(self._fetch, self.pos, n, what=f"read {self.path} at {self.pos}")
        buffer[:n] = data
        self.pos += n
        return n

    def _fetch(self, start: int, n: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=start + n)
        if len(data) != n:
            raise TransientError(f"{self.path}: asked for {n} bytes at {start}, got {len(data)}")
        return data


def open_input(fs: fsspec.AbstractFileSystem, path: str, block_bytes: int = 8 << 20, size: int | None = None):
    """A buffered binary reader for an input file (local: the file itself; remote: a
    :class:`RemoteReader` of ``block_bytes`` blocks; ``size``, when the caller knows it, saves a
    request)."""
    if is_local(fs):
        return open(path, "rb")
    size = call(fs, "size", path) if size is None else size
    return io.BufferedReader(RemoteReader(fs, path, size), buffer_size=block_bytes)


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete a file or folder tree (retried; a missing path is fine)."""
    if exists(fs, path):
        call(fs, "rm", path, recursive=True)


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete temporary files a killed writer left behind (local filesystems only)."""
    if not is_local(fs) or not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if is_temporary(p)]
    for p in stale:
        fs.rm_file(p)
    return len(stale)
