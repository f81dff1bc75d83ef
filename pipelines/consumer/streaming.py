"""Streaming token shards into training: deterministic, resumable, exactly once per epoch.

An epoch is a fixed list of shards (a complete dataset's, or in follow mode the shards committed
when the epoch began) and one order of their samples, a pure function of (seed, epoch, that list)
(see :mod:`pipelines.contract.order`: a global permutation when the set fits the node cache, shard
windows otherwise). Rank r of W takes positions r, r + W, ... from the resume point; within a rank,
DataLoader workers take turns by whole batches, so after k batches every rank has consumed exactly
its first k * batch_size positions and all ranks together a prefix of the order. The state is the
epoch, its shard list and one number (positions consumed), so a resume continues the same sequence
with any world size or worker count.

Shards are read through the node cache (:mod:`pipelines.consumer.node_cache`): fetched once per
node, decoded once, memory-mapped by every process of the node.

Variants: when shards hold V crops per image, one is chosen per (seed, epoch, key) by a stable hash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.consumer.node_cache import ChecksumMismatch, NodeCache, prefetcher
from pipelines.contract.order import ORDERS, EpochOrder, rank_positions
from pipelines.contract.manifest import MANIFEST, load_commits
from pipelines.contract.redact import redact_url
from pipelines.contract.storage import exists, filesystem, join, read_json

log = logging.getLogger(__name__)

SHARD_FIELDS = ("shard", "path", "rows", "bytes", "sha256")
FETCH_THREADS = 4  # shards fetched ahead at once per process (their requests share its slots)


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest checksum."""


class DatasetMismatch(RuntimeError):
    """The token dataset was made with another tokenizer (or codebook) than the run expects."""


class DatasetIncomplete(RuntimeError):
    """The dataset's tokenization job has not finished (or left items uncommitted)."""


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _readable(shards) -> list[dict]:
    return [{k: s[k] for k in SHARD_FIELDS} for s in shards if s.get("path") and s["rows"] > 0]


class TokenDataset(IterableDataset):
    """Samples ``{"key": str, "label": int, "tokens": LongTensor (T,)}`` of a token dataset.

    Args:
        url: the dataset folder (holding ``manifest.json``), local or any fsspec URL.
        seed, shuffle: the epoch order is a function of (seed, epoch, the epoch's shards) only.
        rank, world_size: default to torch.distributed's.
        batch_size: the DataLoader batch size; workers alternate by whole batches so that consumption
            stays a prefix of the order (needed for exact resume).
        expected_fingerprint: refuse a dataset made by another tokenizer.
        vocab_size: refuse a dataset whose codebook differs from the model's vocabulary.
        skip_bad_shards: log and count unreadable shards instead of stopping (each is listed once in
            ``skipped_shards`` of the process that met it, and not fetched again).
        follow: train on a dataset its tokenization job is still writing: each epoch takes the
            shards committed when it begins (waiting for ``min_samples`` of them). Without it an
            incomplete dataset is refused.
        order: ``global``, ``window`` or ``auto`` (global when the set fits ``cache_bytes``).
        window_shards: shards per window in window order (default: what a third of the cache holds).
        cache_dir, cache_bytes, node: the node cache's root folder, budget and node name.
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
        follow: bool = False,
        min_samples: int = 1,
        poll_seconds: float = 10.0,
        follow_patience_seconds: float = 3600.0,
        order: str = "auto",
        window_shards: int | None = None,
        cache_dir: str | None = None,
        cache_bytes: int = 16 << 30,
        node: str | None = None,
    ):
        super().__init__()
        if order not in ("auto", *ORDERS):
            raise ValueError(f"order must be auto or one of {ORDERS}, got {order!r}")
        fs, root = filesystem(url, storage_options)
        if not exists(fs, join(root, MANIFEST)):
            raise FileNotFoundError(f"{redact_url(url)} has no {MANIFEST}")
        m = read_json(fs, join(root, MANIFEST))
        if expected_fingerprint is not None and m["fingerprint"] != expected_fingerprint:
            raise DatasetMismatch(
                f"{redact_url(url)} was tokenized by {m['fingerprint']}, but this run started on {expected_fingerprint}; "
                "tokens from different tokenizers cannot be mixed"
            )
        if vocab_size is not None and m["codebook_size"] != vocab_size:
            raise DatasetMismatch(f"{redact_url(url)} has codebook size {m['codebook_size']} but the model's vocabulary is {vocab_size}")
        if not m.get("complete", True) and not follow:
            done = m.get("totals", {})
            raise DatasetIncomplete(
                f"{redact_url(url)} is incomplete ({done.get('committed_items', '?')} of {done.get('work_items', '?')} work "
                "items committed): its tokenization job is still running or stopped early. Wait for it (or rerun it to "
                "finish), or pass --follow to train on the shards committed so far as they grow."
            )
        self.url, self.storage_options = url, storage_options
        self.manifest = m
        self.fingerprint = m["fingerprint"]
        self.format = m["format"]
        self.variants = len(m["variants"])
        self.tokens_per_image = m["tokens_per_image"]
        self.seed, self.shuffle = seed, shuffle
        dr, dw = _dist_rank_world()
        self.rank = dr if rank is None else rank
        self.world_size = dw if world_size is None else world_size
        self.batch_size = batch_size
        self.skip_bad_shards = skip_bad_shards
        self.follow, self.min_samples, self.poll_seconds = follow, max(1, min_samples), poll_seconds
        self.follow_patience = follow_patience_seconds
        self.order_setting, self.window_setting = order, window_shards
        self.cache_bytes = cache_bytes
        key = hashlib.sha256(f"{url}\0{self.fingerprint}".encode()).hexdigest()[:16]
        self.cache = NodeCache(url, storage_options, key, self.format, root=cache_dir, node=node, budget_bytes=cache_bytes)
        self.skipped_shards: list[str] = []
        self.epoch = 0
        self._begin_epoch(0, self._committed())

    # ------------------------------------------------------------------ the epoch's shards
    def _committed(self) -> list[dict]:
        """The shards to take into a new epoch: the manifest's, or (following a job still writing)
        those committed now, waiting until they hold ``min_samples``; under torch.distributed,
        rank 0's listing, so that every rank's epoch is the same."""
        if not self.follow:
            return _readable(self.manifest["shards"])
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self._list_committed()
        shards = [self._list_committed() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(shards, src=0)
        return shards[0]

    def _list_committed(self) -> list[dict]:
        """Waits while the job commits; a job that commits nothing new for ``follow_patience``
        seconds has most likely stopped (killed, or its cluster gone), and waiting on would hang the
        trainer without a word: that is a :class:`DatasetIncomplete`."""
        fs, root = filesystem(self.url, self.storage_options)
        seen, since = -1, time.monotonic()
        while True:
            m = read_json(fs, join(root, MANIFEST))
            if m.get("complete"):
                return _readable(m["shards"])
            commits = load_commits(fs, root)
            shards = _readable(commits[k] for k in sorted(commits))
            samples = sum(s["rows"] for s in shards)
            if samples >= self.min_samples:
                return shards
            if len(commits) != seen:
                seen, since = len(commits), time.monotonic()
            elif time.monotonic() - since > self.follow_patience:
                raise DatasetIncomplete(
                    f"--follow: no work item was committed to {redact_url(self.url)} for {self.follow_patience:g} s, and "
                    f"its {samples} samples are fewer than the {self.min_samples} needed: is its tokenization job still "
                    "running? Rerun it to finish (it resumes), or wait longer with --follow-patience."
                )
            log.info("--follow: %d samples committed in %s, waiting for %d", samples, redact_url(self.url), self.min_samples)
            time.sleep(self.poll_seconds)

    def _shards_by_name(self, names: list[str]) -> list[dict]:
        known = {s["shard"]: s for s in _readable(self.manifest["shards"])}
        if any(n not in known for n in names):
            fs, root = filesystem(self.url, self.storage_options)
            known.update({s["shard"]: s for s in _readable(load_commits(fs, root).values())})
        missing = [n for n in names if n not in known]
        if missing:
            raise ShardError(f"the saved epoch names shards that {redact_url(self.url)} no longer has: {', '.join(missing[:5])}")
        return [known[n] for n in names]

    def _begin_epoch(self, epoch: int, shards: list[dict], mode: str | None = None, window: int | None = None) -> None:
        self.epoch, self.consumed, self.shards = epoch, 0, shards
        row_bytes = 8 + 48 + self.variants * self.tokens_per_image * 2  # label, a key, the tokens
        shard_bytes = row_bytes * sum(s["rows"] for s in shards) / max(1, len(shards))
        fits = row_bytes * sum(s["rows"] for s in shards) <= self.cache_bytes
        self.mode = mode or (self.order_setting if self.order_setting != "auto" else "global" if fits else "window")
        self.window_shards = window or self.window_setting or max(1, int(self.cache_bytes // 3 // max(1.0, shard_bytes)))
        self.order = EpochOrder([s["rows"] for s in shards], self.seed, epoch, self.mode, self.window_shards, self.shuffle)
        self.offsets = self.order.offsets

    def __len__(self) -> int:
        return len(self.order)

    def close(self) -> None:
        """Leave the node cache (the last process of the node to leave removes it; this also
        happens at interpreter exit)."""
        self.cache.close()

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a no-op for the current one): its shards are fixed now."""
        if epoch != self.epoch:
            self._begin_epoch(epoch, self._committed())

    def state_dict(self) -> dict:
        return {
            "seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "fingerprint": self.fingerprint,
            "order": self.mode, "window_shards": self.window_shards, "shards": [s["shard"] for s in self.shards],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DatasetMismatch(f"state was saved on tokens of {state['fingerprint']}, this dataset is {self.fingerprint}")
        self.seed = int(state["seed"])
        names = state.get("shards")
        shards = self._shards_by_name(list(names)) if names is not None else _readable(self.manifest["shards"])
        # States saved before global order existed were in window order.
        self._begin_epoch(int(state["epoch"]), shards, state.get("order", "window"), int(state["window_shards"]))
        self.consumed = int(state["consumed"])

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank consumed ``samples_per_rank`` more samples (called per batch)."""
        self.consumed = min(len(self), self.consumed + samples_per_rank * self.world_size)

    # ------------------------------------------------------------------ order
    def epoch_order(self) -> np.ndarray:
        """All global sample ids of the current epoch, in training order (for tests and small sets)."""
        return self.order.at(np.arange(len(self.order)))

    def variant_of(self, key: str) -> int:
        if self.variants == 1:
            return 0
        h = hashlib.blake2b(f"{self.seed}:{self.epoch}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") % self.variants

    # ------------------------------------------------------------------ reading
    def _get(self, s: int) -> np.ndarray:
        shard = self.shards[s]
        try:
            return self.cache.get(shard["path"], shard["sha256"])
        except Exception as e:  # noqa: BLE001 - any fetch/parse failure names the shard
            replaced = isinstance(e.__cause__, ChecksumMismatch)  # every fetch of it mismatched
            detail = "does not match its manifest checksum (corrupted or replaced)" if replaced else \
                f"cannot be read: {type(e).__name__}: {e}"
            raise ShardError(f"shard {shard['path']} of {redact_url(self.url)} {detail}") from e

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Read ahead: in window order the next window (the cache is sized for about three), in
        # global order a few shards per fetch thread (every shard stays once fetched).
        lookahead = self.window_shards if self.mode == "window" else 2 * FETCH_THREADS
        ahead = prefetcher(self._get, min(FETCH_THREADS, lookahead))
        mapped: OrderedDict[int, np.ndarray | None] = OrderedDict()
        keep = len(self.shards) if self.mode == "global" else 2 * self.window_shards + 1
        t = self.tokens_per_image
        for block in rank_positions(len(self.order), self.consumed, self.rank, self.world_size, worker, workers,
                                    self.batch_size):
            ids = self.order.at(block)
            shard_of = self.order.shard_of(ids)
            _, first = np.unique(shard_of, return_index=True)
            upcoming = shard_of[np.sort(first)].tolist()  # this block's shards, in first-use order
            for gid, s in zip(ids.tolist(), shard_of.tolist()):
                if s not in mapped:
                    i = upcoming.index(s)
                    ahead(upcoming[i + 1 : i + 1 + lookahead])
                    mapped[s] = self._read(s)
                    if len(mapped) > keep:  # window order: a passed window's pages go
                        old, _ = mapped.popitem(last=False)
                        self.cache.forget(self.shards[old]["path"])
                rows = mapped[s]
                if info is None:  # iterated in this process: the state can count for itself
                    self.consumed = min(len(self), self.consumed + self.world_size)
                if rows is None:
                    continue
                row = rows[gid - int(self.offsets[s])]
                key = row["key"].decode()
                v = self.variant_of(key)
                yield {
                    "key": key,
                    "label": int(row["label"]),
                    "tokens": torch.from_numpy(row["tokens"][v * t : (v + 1) * t].astype(np.int64)),
                }

    def _read(self, s: int) -> np.ndarray | None:
        path = self.shards[s]["path"]
        if path in self.skipped_shards:  # found bad in an earlier epoch: not fetched again
            return None
        try:
            return self._get(s)
        except ShardError as e:
            if not self.skip_bad_shards:
                raise
            log.error("skipping: %s", e)
            self.skipped_shards.append(path)
            return None


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
