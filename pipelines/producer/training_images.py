"""Augmented training images for the tokenizer trainer, streamed from any input the tokenization job
reads (folder, WebDataset, Parquet, LMDB; local or any fsspec URL), in an order that is a pure
function of (seed, epoch).

The input is planned once into work items (the tokenization job's planning, so the same inputs are
accepted and the same bad ones rejected) and each item's samples are counted; that
:class:`ImageIndex` is stored with the run, so a resume sees the same samples in the same order even
if the input grew since. Sample ids are offsets into the items, ordered by
:class:`~pipelines.contract.order.EpochOrder`: a global permutation where a sample can be read on
its own (a folder's file, an LMDB record), windows of items where only whole items can be read
(a tar, a Parquet row group). Rank ``r`` of ``W`` takes positions ``consumed + r + k*W``, so the
global batch of a step holds the same samples whatever the world size, and a resume is one number.

Each sample's augmentation (the ADM random crop and a horizontal flip with p = 0.5) draws from a
generator seeded by (seed, epoch, position). A sample that cannot be used (unreadable, not an
image, rejected by the input checks) is recorded in the batch and replaced by the sample at a
further position fixed by the same triple, so batches keep their size and stay reproducible.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipelines.contract.order import EpochOrder, rank_positions
from pipelines.contract.storage import filesystem, open_input
from pipelines.producer.images import Rejected, decode_image
from pipelines.producer.planning import Plan, plan
from pipelines.producer.sources import Columns, RawSample, WorkItem, detect_format, read_item
from vfmtok_core.crop import random_crop

log = logging.getLogger(__name__)

ROWS_PER_ITEM = 1024  # folder files or LMDB records per work item (one read unit of the index)
RANDOM_ACCESS = ("folder", "lmdb")  # inputs whose samples can be read one at a time
MAX_REPLACEMENTS = 64  # unusable samples in a row before the input is declared unusable


class NoUsableImages(RuntimeError):
    """Every replacement tried for a position was unusable: the input holds (almost) no images."""


@dataclass
class ImageIndex:
    """The planned work items of an input and how many samples each yields."""

    plan: Plan
    counts: np.ndarray
    fmt: str
    url: str

    def __len__(self) -> int:
        return int(self.counts.sum())

    def to_bytes(self) -> bytes:
        return self.plan.to_parquet({"counts": self.counts.tolist(), "format": self.fmt, "url": self.url})

    @staticmethod
    def from_bytes(data: bytes) -> "ImageIndex":
        stored, meta = Plan.from_parquet(data)
        return ImageIndex(stored, np.asarray(meta["counts"], np.int64), meta["format"], meta["url"])

    @staticmethod
    def from_counts(planned: Plan, fmt: str, url: str, counts: Mapping[int, int]) -> "ImageIndex":
        """The index of ``planned`` from the counts of every item (merged from all ranks' shares)."""
        missing = [i for i in range(len(planned)) if i not in counts]
        if missing:
            raise ValueError(f"{len(missing)} of {len(planned)} items were not counted (first: {missing[0]})")
        return ImageIndex(planned, np.asarray([counts[i] for i in range(len(planned))], np.int64), fmt, url)


def plan_input(url: str, storage_options: Mapping | None = None, fmt: str | None = None,
               columns: Columns = Columns()) -> tuple[Plan, str]:
    """(the input's work items, its format): a listing, with no sample read."""
    fmt = fmt or detect_format(url, storage_options)
    return plan(url, fmt, ROWS_PER_ITEM, storage_options, columns), fmt


def count_samples(planned: Plan, fmt: str, storage_options: Mapping | None = None, rank: int = 0, world: int = 1,
                  progress: bool = False) -> dict[int, int]:
    """{item: samples} for rank ``rank``'s share of the items, every input file read by one rank.

    Folders and LMDB are counted from the plan. Parquet needs each file's footer, and a tar has no
    table of contents, so a WebDataset is read whole: ImageNet-21k's 1.3 TB on one node would take
    longer than the collectives' timeout the other ranks wait under, so the reading is split.
    """
    table = planned.table
    if fmt == "folder":
        counts = table.column("files").combine_chunks().value_lengths().to_pylist()
        return {i: counts[i] for i in range(rank, len(counts), world)}
    if fmt == "lmdb":
        counts = [b - a for a, b in zip(table.column("start").to_pylist(), table.column("stop").to_pylist())]
        return {i: counts[i] for i in range(rank, len(counts), world)}

    def shown(results, total: int):
        return tqdm(results, total=total, desc=f"count samples (rank {rank}'s share)", unit="file", disable=not progress,
                    dynamic_ncols=True)

    if fmt == "parquet":
        urls, groups = table.column("url").to_pylist(), table.column("start").to_pylist()
        files = sorted(set(urls))[rank::world]
        with ThreadPoolExecutor(max_workers=16) as pool:
            rows = dict(zip(files, shown(pool.map(lambda u: _row_group_rows(u, storage_options), files), len(files))))
        return {i: rows[u][g] for i, (u, g) in enumerate(zip(urls, groups)) if u in rows}
    mine = range(rank, len(planned), world)
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(shown(pool.map(lambda i: sum(1 for _ in read_item(planned[i], storage_options)), mine), len(mine)))
    return dict(zip(mine, counts))


def build_index(url: str, storage_options: Mapping | None = None, fmt: str | None = None,
                columns: Columns = Columns()) -> ImageIndex:
    """Plan ``url`` and count each item's samples, in this one process."""
    planned, fmt = plan_input(url, storage_options, fmt, columns)
    return ImageIndex.from_counts(planned, fmt, url, count_samples(planned, fmt, storage_options))


def _row_group_rows(url: str, storage_options) -> list[int]:
    fs, path = filesystem(url, storage_options)
    with open_input(fs, path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def to_tensor(img) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)


class _Reader:
    """One sample at a time from an index: single files or records where the input allows it,
    else whole items, of which the last ``keep_items`` read are kept (a window's worth)."""

    def __init__(self, index: ImageIndex, storage_options: Mapping | None, keep_items: int):
        self.index, self.storage_options, self.keep = index, storage_options, max(1, keep_items)
        self._items: OrderedDict[int, WorkItem] = OrderedDict()
        self._samples: OrderedDict[int, list[RawSample]] = OrderedDict()

    def _item(self, unit: int) -> WorkItem:
        if unit not in self._items:
            self._items[unit] = self.index.plan[unit]
            if len(self._items) > 4 * self.keep:
                self._items.popitem(last=False)
        return self._items[unit]

    def read(self, unit: int, offset: int) -> RawSample:
        item = self._item(unit)
        if item.kind == "folder":
            one = replace(item, files=(item.files[offset],), labels=(item.labels[offset],),
                          sizes=(item.sizes[offset],) if item.sizes else ())
            return next(read_item(one, self.storage_options))
        if item.kind == "lmdb":
            return next(read_item(replace(item, start=item.start + offset, stop=item.start + offset + 1), self.storage_options))
        if unit not in self._samples:
            self._samples[unit] = list(read_item(item, self.storage_options))
            if len(self._samples) > self.keep:
                self._samples.popitem(last=False)
        samples = self._samples[unit]
        if offset >= len(samples):  # the file changed since it was indexed
            return RawSample(f"{item.unit}/#{offset}", item.unit, error=("changed", f"{item.unit} holds {len(samples)} samples, {offset + 1}+ when indexed"))
        return samples[offset]


class TrainingImages(IterableDataset):
    """Batches ``{"image": (b, 3, S, S) float in [-1, 1], "label": (b,), "key": [...],
    "rejected": [(key, reason, message), ...]}`` of one rank, from epoch position ``consumed`` on.

    Set :attr:`epoch` and :attr:`consumed` before iterating; with DataLoader workers each worker
    builds whole batches in turn (see :func:`rank_positions`), so the batch sequence is the same
    for any number of workers."""

    def __init__(self, index: ImageIndex, size: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 storage_options: Mapping | None = None, order: str = "auto", window_items: int = 8):
        self.index, self.size, self.batch_size = index, size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.storage_options = storage_options
        self.mode = ("global" if index.fmt in RANDOM_ACCESS else "window") if order == "auto" else order
        self.window_items = window_items
        self.epoch, self.consumed = 0, 0
        if not len(index):
            raise NoUsableImages(f"{index.url} holds no samples")

    def __len__(self) -> int:
        return len(self.index)

    def _order(self) -> EpochOrder:
        return EpochOrder(self.index.counts, self.seed, self.epoch, self.mode, self.window_items)

    def _sample(self, order: EpochOrder, reader: _Reader, position: int, rejected: list) -> tuple[torch.Tensor, int, str]:
        n = len(order)
        rng = np.random.default_rng([self.seed, self.epoch, position, 0xA06])
        for attempt in range(MAX_REPLACEMENTS):
            # The first try is the position's own sample; replacements are other positions drawn
            # from the same generator, so they are fixed by (seed, epoch, position) too.
            where = position if attempt == 0 else int(rng.integers(0, n))
            sample_id = int(order.at(np.array([where]))[0])
            unit = int(order.shard_of(np.array([sample_id]))[0])
            raw = reader.read(unit, sample_id - int(order.offsets[unit]))
            if raw.error is None:
                try:
                    img = decode_image(raw.data)
                except Rejected as e:
                    raw = replace(raw, error=(e.reason, str(e)))
                else:
                    crop = random_crop(img, self.size, rng)
                    if rng.random() < 0.5:
                        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    return to_tensor(crop), -1 if raw.label is None else raw.label, raw.key
            rejected.append((raw.key, *raw.error))
        raise NoUsableImages(f"{MAX_REPLACEMENTS} samples in a row were unusable near position {position} of {self.index.url}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self._order()
        n_batches = (len(order) - self.consumed) // (self.batch_size * self.world)
        reader = _Reader(self.index, self.storage_options, self.window_items)
        for positions in rank_positions(len(order), self.consumed, self.rank, self.world, worker, workers, self.batch_size):
            for start in range(0, len(positions) - self.batch_size + 1, self.batch_size):
                # Batch k of this rank is batch k of the epoch's global batches from ``consumed`` on.
                k = (int(positions[start]) - self.consumed - self.rank) // self.world // self.batch_size
                if k >= n_batches:
                    return
                rejected: list = []
                picked = [self._sample(order, reader, int(p), rejected) for p in positions[start : start + self.batch_size]]
                images, labels, keys = zip(*picked)
                yield {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
                       "key": list(keys), "rejected": rejected}


def image_loader(images: TrainingImages, num_workers: int = 0) -> DataLoader:
    """A DataLoader over whole batches (decode and augmentation run in ``num_workers`` processes)."""
    return DataLoader(images, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)
