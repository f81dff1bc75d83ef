"""Token shards fetched once per node, into a folder that every rank and DataLoader worker of the
node reads memory-mapped.

Layout: ``<root>/vfmtok-<dataset key>/node-<node>/``, with one ``<shard>-<sha256[:16]>.npy`` per
shard (a structured array: label, key, tokens; fixed width, so a row is read without decoding
anything else), ``<shard>.lock`` files, and ``users.lock``.

- **One fetch per node.** A shard missing from the folder is fetched under an exclusive lock on its
  ``.lock`` file; a process that finds the lock held waits, then reads what the holder wrote. The
  bytes are checked against the manifest's sha256, decoded once, written to a temporary name and
  renamed into place, so a reader never sees half a file. Locks are ``flock``s: the kernel drops
  them when a process dies, so a crash never leaves a shard locked.
- **Memory follows consumption.** A process maps the shards it reads; pages are loaded as rows are
  touched and are shared by all processes of the node through the page cache.
- **A byte budget.** After each fill, while the folder holds more than ``budget_bytes``, the least
  recently used entries are removed (a process that still maps one keeps reading it: the file is
  gone from the folder, not from its mapping). When the whole set fits, nothing is ever evicted.
- **Cleaned up at exit.** Each process using the folder holds a shared lock on ``users.lock`` (a
  rank from when it opens the dataset, a DataLoader worker while it lives); a rank's
  :meth:`NodeCache.close` (called at interpreter exit as well) releases it and deletes the folder
  when no other process holds one. A folder left by a killed run is reused by its rerun; the
  node's folders of other datasets that no process uses (runs that were killed and not rerun) are
  removed when a dataset is opened, so that crashed runs cannot fill the disk over weeks.

The node is named by ``VFMTOK_NODE``, else torchrun's ``GROUP_RANK``, else Ray Train's
``NODE_RANK``, else the host name (see :func:`node_name`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping

import numpy as np

from pipelines.contract.retry import RetryPolicy, TransientError, retrying
from pipelines.contract.shards import decode_shard
from pipelines.contract.storage import filesystem, join, read_bytes

log = logging.getLogger(__name__)

CHECKSUM_ATTEMPTS = 3


def node_name() -> str:
    for var in ("VFMTOK_NODE", "GROUP_RANK", "NODE_RANK"):
        if os.environ.get(var):
            return os.environ[var]
    return socket.gethostname()


def default_root() -> str:
    return os.environ.get("VFMTOK_CACHE_DIR") or tempfile.gettempdir()


def rows_to_array(keys: list[str], labels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Decoded shard columns as one structured array (keys UTF-8, fixed width per shard)."""
    encoded = [k.encode() for k in keys]
    width = max([1, *map(len, encoded)])
    dtype = np.dtype([("label", "<i8"), ("key", f"S{width}"), ("tokens", "<u2", (tokens.shape[1],))])
    out = np.empty(len(keys), dtype)
    out["label"], out["key"], out["tokens"] = labels, encoded, tokens
    return out


@contextlib.contextmanager
def _flock(path: str, mode: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


_DATASET_FOLDER = re.compile(r"vfmtok-[0-9a-f]{16}")  # what NodeCache names a dataset's folder (see TokenDataset)


def _sweep(root: str, node_folder: str, keep: str) -> None:
    """Remove this node's cache folders under ``root`` (other than ``keep``) that no process uses.

    Unused means an exclusive lock on its ``users.lock`` is granted at once: every process that
    reads a folder holds a shared one. Removal follows :meth:`NodeCache.close`'s protocol (under that
    lock, so a process attaching meanwhile sees its lock file vanish and starts over). A folder
    without a lock file is being made or removed by someone else and is left alone. Other nodes'
    folders are never touched: a root shared between nodes may not share their locks. Best effort:
    a folder that cannot be removed is skipped, never an error for the caller."""
    removed, freed = 0, 0
    for dataset in os.listdir(root) if os.path.isdir(root) else ():
        folder = os.path.join(root, dataset, node_folder)
        if not _DATASET_FOLDER.fullmatch(dataset) or folder == keep:
            continue
        lock = os.path.join(folder, "users.lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                continue  # removed and made again meanwhile: that one is someone's
            freed += _folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(folder))
            removed += 1
        except OSError:  # in use (BlockingIOError), or removed by another process meanwhile
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("node cache: removed %d folders (%.1f MB) of runs that ended without cleaning up", removed, freed / 1e6)


def _folder_bytes(folder: str) -> int:
    total = 0
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):  # a file may go as it is counted
            total += entry.stat().st_size if entry.is_file() else 0
    return total


class NodeCache:
    """The node's shared folder for one dataset (see the module docstring).

    Args:
        url, storage_options: the dataset folder.
        key: names the dataset (its URL and tokenizer fingerprint): datasets never share a folder.
        fmt: the shards' format (``parquet`` or ``webdataset``).
        root, node: where the node's folders live and which node this is (defaults above).
        budget_bytes: most bytes the folder holds.
    """

    def __init__(self, url: str, storage_options: Mapping | None, key: str, fmt: str, *,
                 root: str | None = None, node: str | None = None, budget_bytes: int = 8 << 30):
        self.url, self.storage_options, self.fmt = url, dict(storage_options or {}), fmt
        self.dir = os.path.join(root or default_root(), f"vfmtok-{key}", f"node-{node or node_name()}")
        self.budget = budget_bytes
        self._pid, self._fs, self._users, self._maps, self._lock = None, None, None, {}, threading.Lock()
        self._owner = os.getpid()  # only this process removes the folder (never a DataLoader worker)
        self._attach()

    def __getstate__(self) -> dict:  # a DataLoader worker attaches on its own
        state = dict(self.__dict__)
        state.update(_pid=None, _fs=None, _users=None, _maps={}, _lock=None)
        return state

    def _attach(self) -> None:
        """Join the folder's users in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        self._pid, self._fs, self._maps, self._lock = os.getpid(), None, {}, threading.Lock()
        while True:
            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, "users.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a folder removed meanwhile
                    break
            os.close(fd)
        self._users = fd
        if self._owner == self._pid:
            atexit.register(self.close)
            _sweep(os.path.dirname(os.path.dirname(self.dir)), os.path.basename(self.dir), keep=self.dir)

    def close(self) -> None:
        """Leave the folder; the last process of the node to leave removes it. A DataLoader worker
        only lets go (at its exit): its dataset's process still uses the folder."""
        if self._pid != os.getpid() or self._users is None or self._owner != self._pid:
            return
        fd, self._users, self._maps = self._users, None, {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return  # others still read it
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.dir))  # the dataset's folder, once no node folder is left
        os.close(fd)

    def _entry(self, path: str, sha256: str) -> str:
        stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
        return os.path.join(self.dir, f"{stem}-{sha256[:16]}.npy")

    def get(self, path: str, sha256: str) -> np.ndarray:
        """The shard's rows (a read-only memory map), fetched by this node if no process has yet.
        Raises what the fetch raised (a missing shard, a checksum that never matches)."""
        self._attach()
        if path in self._maps:
            return self._maps[path]
        entry = self._entry(path, sha256)
        while True:
            if not os.path.exists(entry):
                with _flock(entry[: -len(".npy")] + ".lock", fcntl.LOCK_EX):
                    if not os.path.exists(entry):
                        self._fill(path, sha256, entry)
            try:
                rows = np.load(entry, mmap_mode="r")
                break
            except FileNotFoundError:
                continue  # evicted (by another fill, under budget pressure) before it was mapped: again
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry)  # recency, for eviction
        with self._lock:
            self._maps[path] = rows
        return rows

    def forget(self, path: str) -> None:
        """Drop this process's mapping of a shard (window order: a passed window's pages go)."""
        with self._lock:
            self._maps.pop(path, None)

    def _filesystem(self):
        if self._fs is None:
            opts = dict(self.storage_options)
            if "://" in self.url and not self.url.startswith("file://"):
                opts.setdefault("skip_instance_cache", True)  # s3fs instances are not fork-safe
            self._fs, self._root = filesystem(self.url, opts)
        return self._fs

    def _fetch_verified(self, path: str, sha256: str) -> bytes:
        data = read_bytes(self._filesystem(), join(self._root, path))
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ChecksumMismatch(f"{path}: its bytes do not match the manifest's sha256")
        return data

    def _fill(self, path: str, sha256: str, entry: str) -> None:
        # The request itself is retried by ``read_bytes``; a mismatch is fetched again a few times
        # (a body damaged in flight), and one that persists is a replaced or corrupt shard.
        policy = dataclasses.replace(RetryPolicy.from_env(), attempts=CHECKSUM_ATTEMPTS)
        data = retrying(self._fetch_verified, path, sha256, what=f"download {path}", remote=False, policy=policy)
        rows = rows_to_array(*decode_shard(data, self.fmt))
        tmp = f"{entry}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                np.save(f, rows)
            os.replace(tmp, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._evict(keep=entry)

    def _evict(self, keep: str) -> None:
        with _flock(os.path.join(self.dir, "evict.lock"), fcntl.LOCK_EX):
            entries = []
            for e in os.scandir(self.dir):
                if e.name.endswith(".npy"):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat()
                        entries.append((st.st_mtime, st.st_size, e.path))
            total = sum(size for _, size, _ in entries)
            for _, size, victim in sorted(entries):
                if total <= self.budget:
                    break
                if victim != keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(victim)
                    total -= size

    def held_bytes(self) -> int:
        """Bytes of shards in the node's folder now."""
        try:
            return sum(e.stat().st_size for e in os.scandir(self.dir) if e.name.endswith(".npy"))
        except FileNotFoundError:
            return 0


class ChecksumMismatch(TransientError):
    """Fetched bytes that differ from the manifest's sha256: retried (damaged in flight), then
    reported as a corrupt or replaced shard."""


def prefetcher(get: Callable[[int], object], threads: int) -> Callable[[list[int]], None]:
    """``ahead(shards)`` starts fetching ``shards`` on up to ``threads`` background threads (each
    shard at most once per process); errors are left for the reader's own ``get`` to raise."""
    started: set[int] = set()
    slots = threading.Semaphore(threads)

    def run(shard: int) -> None:
        try:
            get(shard)
        except Exception:  # noqa: BLE001 - the reader fetches again and reports it
            log.debug("read-ahead of shard %d failed", shard, exc_info=True)
        finally:
            slots.release()

    def ahead(shards: list[int]) -> None:
        for s in shards:
            if s in started:
                continue
            if not slots.acquire(blocking=False):
                return
            started.add(s)
            threading.Thread(target=run, args=(s,), daemon=True).start()

    return ahead
