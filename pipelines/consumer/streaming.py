"""Streaming token shards into training: deterministic, resumable, exactly once per epoch.

Sample order. Every epoch has one *global* order of all samples, a pure function of (seed, epoch):
shards are permuted, cut into windows of ``window_shards`` consecutive shards, and the samples of
each window are shuffled together. Rank r takes global positions r, r + W, r + 2W, ...; within a
rank, DataLoader workers take turns by whole batches, so after k batches a rank has consumed exactly
its first k * batch_size positions and all ranks together a prefix of the global order. The state
is therefore one number (samples consumed this epoch); resuming continues from that prefix, with
any world size or worker count.

Shuffle quality: a window of shards is shuffled as a unit, so a batch mixes samples from up to
``window_shards`` shards; by default the window is as many shards as fit in a 256 MiB token buffer
(about half a million images at 256 tokens and two variants), which on ImageNet-size data is close
to a full shuffle (``bench/loader.py`` measures label mixing against one). Each process reads at
most a window of shards at a time, cached locally within a byte budget and read ahead in the
background.

Variants: when shards hold V crops per image, one is chosen per (seed, epoch, key) by a stable hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.contract.manifest import MANIFEST
from pipelines.contract.shards import decode_shard
from pipelines.contract.retry import TransientError, retrying
from pipelines.contract.storage import exists, filesystem, is_local, join, read_bytes, read_json

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest checksum."""


class DatasetMismatch(RuntimeError):
    """The token dataset was made with another tokenizer (or codebook) than the run expects."""


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardCache:
    """Shard bytes by relative path: local files are read in place; remote ones are downloaded to a
    local folder (LRU within ``budget_bytes``) and the next ones are fetched ahead in threads.

    A download lands in the cache only when its sha256 matches the manifest (a body cut short or
    damaged on the way is fetched again, a bounded number of times), and the requests of all
    read-ahead threads share the process's request slots (see :func:`pipelines.contract.retry.retrying`).
    """

    def __init__(
        self, url: str, storage_options: Mapping | None, cache_dir: str | None, budget_bytes: int,
        checksums: Mapping[str, str],
    ):
        self.url, self.storage_options = url, dict(storage_options or {})
        self.checksums = dict(checksums)
        self.budget = budget_bytes
        self.cache_dir = cache_dir
        self._fs = None
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._pending: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def _filesystem(self):
        # Created lazily inside each worker process: s3fs instances are not fork-safe.
        if self._fs is None:
            opts = dict(self.storage_options)
            if "://" in self.url and not self.url.startswith("file://"):
                opts.setdefault("skip_instance_cache", True)
            self._fs, self._root = filesystem(self.url, opts)
            if not is_local(self._fs):
                if self.cache_dir is None:
                    self.cache_dir = tempfile.mkdtemp(prefix="vfmtok-shards-")
                os.makedirs(self.cache_dir, exist_ok=True)
        return self._fs

    def _local_path(self, rel: str) -> str:
        return os.path.join(self.cache_dir, rel.replace("/", "__"))

    def _fetch_verified(self, rel: str) -> bytes:
        data = read_bytes(self._filesystem(), join(self._root, rel))
        if hashlib.sha256(data).hexdigest() != self.checksums[rel]:
            raise TransientError(f"{rel}: downloaded bytes do not match the manifest's sha256")
        return data

    def _download(self, rel: str) -> None:
        dst = self._local_path(rel)
        tmp = f"{dst}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            data = retrying(self._fetch_verified, rel, what=f"download {rel}", remote=False)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _download_ahead(self, rel: str) -> None:
        try:
            self._download(rel)
        except Exception:  # noqa: BLE001 - read() downloads again and reports the error then
            log.debug("read-ahead of %s failed", rel, exc_info=True)

    def prefetch(self, rels: list[str]) -> None:
        fs = self._filesystem()
        if is_local(fs):
            return
        for rel in rels:
            with self._lock:
                if rel in self._pending or os.path.exists(self._local_path(rel)):
                    continue
                t = threading.Thread(target=self._download_ahead, args=(rel,), daemon=True)
                self._pending[rel] = t
            t.start()

    def read(self, rel: str) -> bytes:
        fs = self._filesystem()
        if is_local(fs):
            with open(join(self._root, rel), "rb") as f:
                return f.read()
        with self._lock:
            pending = self._pending.pop(rel, None)
        if pending is not None:
            pending.join()
        path = self._local_path(rel)
        if not os.path.exists(path):
            self._download(rel)
        with open(path, "rb") as f:
            data = f.read()
        self._lru[rel] = len(data)
        self._lru.move_to_end(rel)
        while sum(self._lru.values()) > self.budget and len(self._lru) > 1:
            old, _ = self._lru.popitem(last=False)
            if os.path.exists(self._local_path(old)):
                os.remove(self._local_path(old))
        return data


class TokenDataset(IterableDataset):
    """Samples ``{"key": str, "label": int, "tokens": LongTensor (T,)}`` from a token dataset's manifest.

    Args:
        url: the dataset folder (holding ``manifest.json``), local or any fsspec URL.
        seed, shuffle: the epoch order is a function of (seed, epoch) only.
        rank, world_size: default to torch.distributed's.
        batch_size: the DataLoader batch size; workers alternate by whole batches so that consumption
            stays a prefix of the order (needed for exact resume).
        expected_fingerprint: refuse a dataset made by another tokenizer.
        vocab_size: refuse a dataset whose codebook differs from the model's vocabulary.
        skip_bad_shards: log and count unreadable shards instead of stopping.
        window_shards: shards shuffled together (see the module docstring); by default as many as
            fit in ``shuffle_buffer_bytes`` of decoded tokens (they are held in memory per process).
        cache_dir, cache_bytes: where remote shards are kept and how much of them.
    """

    def __init__(
        self,
        url: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: Mapping | None = None,
        batch_size: int = 1,
        expected_fingerprint: str | None = None,
        vocab_size: int | None = None,
        skip_bad_shards: bool = False,
        window_shards: int | None = None,
        shuffle_buffer_bytes: int = 256 << 20,
        cache_dir: str | None = None,
        cache_bytes: int = 2 << 30,
    ):
        super().__init__()
        fs, root = filesystem(url, storage_options)
        path = join(root, MANIFEST)
        if not exists(fs, path):
            raise FileNotFoundError(f"{url} has no {MANIFEST}")
        m = read_json(fs, path)
        if expected_fingerprint is not None and m["fingerprint"] != expected_fingerprint:
            raise DatasetMismatch(
                f"{url} was tokenized by {m['fingerprint']}, but this run started on {expected_fingerprint}; "
                "tokens from different tokenizers cannot be mixed"
            )
        if vocab_size is not None and m["codebook_size"] != vocab_size:
            raise DatasetMismatch(f"{url} has codebook size {m['codebook_size']} but the model's vocabulary is {vocab_size}")
        self.url, self.storage_options = url, storage_options
        self.manifest = m
        self.fingerprint = m["fingerprint"]
        self.format = m["format"]
        self.variants = len(m["variants"])
        self.tokens_per_image = m["tokens_per_image"]
        self.shards = [s for s in m["shards"] if s.get("path") and s["rows"] > 0]
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self.shards])]).astype(np.int64)
        self.seed, self.shuffle = seed, shuffle
        dr, dw = _dist_rank_world()
        self.rank = dr if rank is None else rank
        self.world_size = dw if world_size is None else world_size
        self.batch_size = batch_size
        self.skip_bad_shards = skip_bad_shards
        if window_shards is None:
            shard_bytes = (self.offsets[-1] / max(1, len(self.shards))) * self.variants * self.tokens_per_image * 2
            window_shards = int(shuffle_buffer_bytes // max(1.0, shard_bytes))
        self.window_shards = max(1, window_shards)
        self.cache = ShardCache(url, storage_options, cache_dir, cache_bytes, {s["path"]: s["sha256"] for s in self.shards})
        self.epoch = 0
        self.consumed = 0  # global samples consumed this epoch (a prefix of the epoch order)
        self.skipped_shards: list[str] = []

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {
            "seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "fingerprint": self.fingerprint,
            "window_shards": self.window_shards,  # part of the order: a resume must reuse it
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DatasetMismatch(f"state was saved on tokens of {state['fingerprint']}, this dataset is {self.fingerprint}")
        self.seed, self.epoch, self.consumed = int(state["seed"]), int(state["epoch"]), int(state["consumed"])
        self.window_shards = int(state.get("window_shards", self.window_shards))

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank consumed ``samples_per_rank`` more samples (called per batch)."""
        self.consumed = min(len(self), self.consumed + samples_per_rank * self.world_size)

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """All global sample ids of an epoch, in training order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.shards))
        out = []
        for w in range(0, len(perm), self.window_shards):
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in perm[w : w + self.window_shards]])
            out.append(ids[rng.permutation(len(ids))])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def positions(self, worker: int = 0, num_workers: int = 1) -> np.ndarray:
        """Global sample ids this rank/worker yields from the current resume point, in order."""
        remaining = self.epoch_order()[self.consumed :]
        mine = remaining[self.rank :: self.world_size]
        if num_workers == 1:
            return mine
        b = self.batch_size
        chunk = np.arange(len(mine)) // b
        return mine[chunk % num_workers == worker]

    def variant_of(self, key: str) -> int:
        if self.variants == 1:
            return 0
        h = hashlib.blake2b(f"{self.seed}:{self.epoch}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") % self.variants

    # ------------------------------------------------------------------ reading
    def _load(self, shard_idx: int):
        shard = self.shards[shard_idx]
        try:
            data = self.cache.read(shard["path"])
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise ShardError(f"shard {shard['path']} does not match its manifest checksum (corrupted or replaced)")
            return decode_shard(data, self.format)
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - any read/parse failure names the shard
            raise ShardError(f"cannot read shard {shard['path']} of {self.url}: {type(e).__name__}: {e}") from e

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        ids = self.positions(worker, num_workers)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        # Shards in first-use order, for read-ahead.
        _, first = np.unique(shard_of, return_index=True)
        upcoming = [int(s) for s in shard_of[np.sort(first)]]
        loaded: dict[int, tuple] = {}
        t = self.tokens_per_image
        ahead = 0
        for gid, s in zip(ids.tolist(), shard_of.tolist()):
            if s not in loaded:
                while ahead < len(upcoming) and upcoming[ahead] != s:
                    ahead += 1
                self.cache.prefetch([self.shards[x]["path"] for x in upcoming[ahead + 1 : ahead + 1 + self.window_shards]])
                try:
                    loaded[s] = self._load(s)
                except ShardError as e:
                    if not self.skip_bad_shards:
                        raise
                    log.error("skipping: %s", e)
                    self.skipped_shards.append(self.shards[s]["path"])
                    loaded[s] = None
                if len(loaded) > self.window_shards + 1:  # keep memory to about a window of shards
                    loaded.pop(next(iter(loaded)))
            shard = loaded[s]
            if info is None:  # iterated in this process: the state can count for itself
                self.consumed = min(len(self), self.consumed + self.world_size)
            if shard is None:
                continue
            keys, labels, tokens = shard
            row = gid - int(self.offsets[s])
            v = self.variant_of(keys[row])
            yield {
                "key": keys[row],
                "label": int(labels[row]),
                "tokens": torch.from_numpy(tokens[row, v * t : (v + 1) * t].astype(np.int64)),
            }


def collate(samples: list[dict]) -> dict:
    return {
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "tokens": torch.stack([s["tokens"] for s in samples]),
    }


class TokenLoader:
    """Batches from a :class:`TokenDataset` through a DataLoader, keeping the dataset's resume state
    current in the main process (one ``advance`` per batch)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, num_workers: int = 0, **kwargs):
        dataset.batch_size = batch_size
        self.dataset = dataset
        self.batch_size = batch_size
        self.loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
            persistent_workers=False, **kwargs,
        )
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if self.num_workers > 0:  # in-process iteration already counted itself
                self.dataset.advance(len(batch["key"]))
            yield batch
