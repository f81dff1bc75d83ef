"""Planning: list the input, split it into deterministic work items, store the plan as Parquet.

Sized for ImageNet-21k (14M files, 21k class folders):

- **Listing fans out over prefixes.** The input's top level is listed once; each folder under it is
  then listed on its own, 16 at a time. On S3 a recursive listing is a serial chain of 1000-key
  pages (about 7 minutes for 14M keys at 30 ms a page); per-prefix listings overlap their pages.
  Results come back in sorted path order without a global sort.
- **The plan lives in Arrow.** As Python objects (a tuple of paths per work item) a 14M-file plan
  is several GB in the driver; as an Arrow table it is about the size of its paths, and a work item
  becomes Python objects only when it is dispatched (:meth:`Plan.__getitem__`).
- **Stored as Parquet** (``_state/plan.parquet``): compressed paths, read back in one request,
  with the identity and the class names in the file's metadata.
- **Growing inputs** (:func:`extend`): files that appeared since the plan was made become new work
  items after the planned ones; files that vanished or changed size are reported (and an
  uncommitted item refuses a changed file when it reads it, see :mod:`pipelines.producer.sources`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.contract.storage import call, filesystem, find, is_local
from pipelines.producer.sources import (
    IMAGE_EXTS, Columns, InputError, WorkItem, is_local_url, lmdb_count, parquet_footer, url_of,
)

LISTINGS_IN_FLIGHT = 16
PLAN_SCHEMA = pa.schema([
    ("shard", pa.string()), ("kind", pa.string()), ("url", pa.string()),
    ("start", pa.int64()), ("stop", pa.int64()),
    ("files", pa.list_(pa.string())), ("labels", pa.list_(pa.int32())), ("sizes", pa.list_(pa.int64())),
    ("unit", pa.string()), ("bytes", pa.int64()), ("columns", pa.list_(pa.string())),
])
_META_KEY = b"vfmtok.plan"


@dataclass
class Plan:
    """Work items as an Arrow table (one row each, in shard order) and a folder input's class names
    (label i is ``classes[i]``; [] for other inputs). A sequence of :class:`WorkItem`."""

    table: pa.Table
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> WorkItem:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return WorkItem.from_dict(self.table.slice(i % len(self), 1).to_pylist()[0])

    def select(self, indices: list[int]) -> "Plan":
        """The items at ``indices``, in that order."""
        return Plan(self.table.take(pa.array(indices, pa.int64())), self.classes)

    @property
    def shards(self) -> list[str]:
        return self.table.column("shard").to_pylist()

    @property
    def item_bytes(self) -> list[int]:
        return self.table.column("bytes").to_pylist()

    def inputs(self) -> int:
        """How many inputs (files, or LMDB records) the plan reads."""
        kind = self.table.column("kind")[0].as_py() if len(self) else ""
        if kind == "folder":
            return sum(self.table.column("files").combine_chunks().value_lengths().to_pylist())
        if kind == "lmdb":
            return sum(b - a for a, b in zip(self.table.column("start").to_pylist(), self.table.column("stop").to_pylist()))
        return len(set(self.table.column("url").to_pylist()))

    def to_parquet(self, identity: dict) -> bytes:
        meta = {_META_KEY: json.dumps({"identity": identity, "classes": self.classes}).encode()}
        buf = io.BytesIO()
        pq.write_table(self.table.replace_schema_metadata(meta), buf, compression="zstd")
        return buf.getvalue()

    @staticmethod
    def from_parquet(data: bytes) -> tuple["Plan", dict]:
        """(plan, the identity it was stored with)."""
        # Not pq.read_table: it scans through Arrow's dataset layer, whose background threads can
        # still be starting when a short-lived process exits, and pyarrow 26.0.1 then aborts in
        # teardown ("terminate called without an active exception", exit 134; apache/arrow#34314).
        # A job that fails right after reading its plan did so in about half of its runs.
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
        meta = json.loads(table.schema.metadata[_META_KEY])
        return Plan(table.replace_schema_metadata(None).cast(PLAN_SCHEMA), meta["classes"]), meta["identity"]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def list_files(fs, root: str, keep: Callable[[str], bool]) -> pa.Table:
    """Files under ``root`` that ``keep`` accepts, as a table (path, size) sorted by path.

    The top level is listed once, then each folder under it by its own recursive listing, many at a
    time. Entries are taken in the order of their names (a folder's as ``name/``), which is exactly
    sorted full-path order, so no global sort (and no list of every path in Python) is needed."""
    top = [e for e in call(fs, "ls", root, detail=True) if e["name"].rstrip("/") != root]
    entries = sorted(top, key=lambda e: e["name"].rstrip("/") + ("/" if e["type"] == "directory" else ""))

    def table(rows: list[tuple[str, int]]) -> pa.Table:
        rows.sort()
        return pa.table({"path": pa.array([p for p, _ in rows], pa.string()),
                         "size": pa.array([s for _, s in rows], pa.int64())})

    def below(entry: dict) -> pa.Table:
        if entry["type"] != "directory":
            name = entry["name"]
            return table([(name, int(entry["size"]))] if keep(name) else [])
        if is_local(fs):
            return table([(p, n) for p, n in _walk_local(entry["name"].rstrip("/")) if keep(p)])
        found = find(fs, entry["name"].rstrip("/"), detail=True)
        return table([(p, int(i["size"])) for p, i in found.items() if i.get("type") != "directory" and keep(p)])

    with ThreadPoolExecutor(max_workers=LISTINGS_IN_FLIGHT) as pool:
        parts = list(pool.map(below, entries))
    return pa.concat_tables(parts) if parts else table([])


def _walk_local(top: str) -> list[tuple[str, int]]:
    """(path, size) of every file under a local folder, as fsspec's ``find`` lists them: a linked
    file is listed (it is refused at read time if it points out of the input), a linked folder is
    not walked. ``os.scandir`` gives the sizes without the per-file info dicts that ``find`` builds."""
    out, stack = [], [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif not e.is_dir():
                        out.append((e.path, e.stat().st_size))
                except FileNotFoundError:  # a dangling link, or a file removed while listing
                    continue
    return out


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


_SUFFIX = {"folder": _is_image, "webdataset": lambda p: p.endswith(".tar"), "parquet": lambda p: p.endswith(".parquet")}


def list_input(url: str, fmt: str, storage_options: Mapping | None = None) -> tuple[pa.Table, str]:
    """(files of the input that ``fmt`` reads, as (path, size) sorted; the folder keys are relative
    to). A single-file input is its own listing."""
    fs, root = filesystem(url, storage_options)
    if call(fs, "isfile", root):
        return pa.table({"path": [root], "size": pa.array([call(fs, "size", root)], pa.int64())}), root.rsplit("/", 1)[0]
    return list_files(fs, root, _SUFFIX[fmt]), root


def _rel(base: str, path: str) -> str:
    return path[len(base) :].lstrip("/") if path.startswith(base) else path


def _rows(url: str, fmt: str, listing: pa.Table, base: str, columns: Columns, storage_options) -> list[dict]:
    """Work item rows of a tar or Parquet listing (few files: Python objects are fine)."""
    fs, _ = filesystem(url, storage_options)
    paths, sizes = listing.column("path").to_pylist(), listing.column("size").to_pylist()
    if fmt == "webdataset":
        return [dict(kind=fmt, url=url_of(fs, p), unit=_rel(base, p)[: -len(".tar")], bytes=n, sizes=[n])
                for p, n in zip(paths, sizes)]
    if fmt == "parquet":
        with ThreadPoolExecutor(max_workers=16) as pool:
            footers = list(pool.map(lambda p: parquet_footer(fs, p, columns), paths))
        return [
            dict(kind=fmt, url=url_of(fs, p), start=g, stop=g + 1, unit=_rel(base, p)[: -len(".parquet")],
                 bytes=nbytes, sizes=[n], columns=list(cols))
            for p, n, (cols, group_bytes) in zip(paths, sizes, footers)
            for g, nbytes in enumerate(group_bytes)
        ]
    raise ValueError(f"unknown input format {fmt!r}")


def _table(rows: list[dict], first_shard: int) -> pa.Table:
    defaults = dict(start=0, stop=0, files=[], labels=[], sizes=[], unit="", bytes=0, columns=["", "", ""])
    out = []
    for k, row in enumerate(rows):
        out.append({**defaults, **{k2: v for k2, v in row.items() if v is not None}, "shard": shard_name(first_shard + k)})
    return pa.Table.from_pylist(out, schema=PLAN_SCHEMA)


def _relative(listing: pa.Table, base: str) -> pa.Array:
    """The listing's paths relative to ``base``, computed in Arrow (no Python string per file)."""
    paths = listing.column("path").combine_chunks().cast(pa.large_string())
    return pc.utf8_slice_codeunits(paths, len(base.rstrip("/")) + 1)


def _first_parts(rel: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(the first component of each relative path, whether the path has one below the root)."""
    nested = pc.match_substring(rel, "/")
    return pc.list_element(pc.split_pattern(rel, "/", max_splits=1), 0), nested


def _folder_classes(rel: pa.Array) -> list[str]:
    """Class names of an ImageNet-style folder (sorted subfolder names: label i is ``classes[i]``),
    or [] when some image lies directly under the root (then no image is labelled)."""
    if not len(rel):
        return []
    first, nested = _first_parts(rel)
    if not pc.all(nested).as_py():
        return []
    return sorted(pc.unique(first).to_pylist())


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """The plan order of a folder's files (given in listing order, with their class labels): the
    classes interleaved, each spread evenly over the whole plan (the i-th of a class's n files sits
    at fraction (i + 0.5) / n; ties by label), each class's files kept in listing order.

    A listing of class folders is sorted by class; planned as is, each shard would hold one or two
    classes, and a trainer that shuffles by windows of shards (a set larger than its node cache)
    would see few classes per window. Interleaved, every shard holds a sample of all classes."""
    n = len(labels)
    if n == 0 or (labels == labels[0]).all():
        return np.arange(n)
    by_class = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(labels[by_class])) + 1]
    counts = np.diff(np.r_[starts, n])
    fraction = np.empty(n)
    fraction[by_class] = (np.arange(n) - np.repeat(starts, counts) + 0.5) / np.repeat(counts, counts)
    return np.lexsort((labels, fraction))


def _folder_table(url: str, rel: pa.Array, sizes: pa.Array, classes: list[str], rows_per_shard: int,
                  first_shard: int, first_file: int) -> pa.Table:
    """Work items of a folder's files, ``rows_per_shard`` each, built as Arrow arrays: a 14M-file
    plan never becomes 14M Python strings. A file's label is its class folder's index in
    ``classes`` (-1: no class); classes are interleaved (see :func:`interleaved_order`). Item k covers
    files ``first_file + k*rows_per_shard ...`` of the plan."""
    n = len(rel)
    if classes:
        first, nested = _first_parts(rel)
        index = pc.index_in(first, value_set=pa.array(classes, pa.large_string()))
        labels = pc.if_else(nested, pc.fill_null(index, -1), -1).cast(pa.int32())
    else:
        labels = pa.array(np.full(n, -1, np.int32))
    order = pa.array(interleaved_order(labels.to_numpy(zero_copy_only=False)))
    rel, sizes, labels = rel.take(order), sizes.take(order), labels.take(order)
    starts = np.arange(0, n, rows_per_shard, dtype=np.int64)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    size_values = sizes.to_numpy(zero_copy_only=False).astype(np.int64)
    k = len(starts)
    begin = first_file + starts
    return pa.table({
        "shard": pa.array([shard_name(first_shard + i) for i in range(k)], pa.string()),
        "kind": pa.array(["folder"] * k, pa.string()),
        "url": pa.array([url] * k, pa.string()),
        "start": pa.array(begin), "stop": pa.array(begin + np.diff(np.append(starts, n))),
        "files": pa.ListArray.from_arrays(offsets, rel.cast(pa.string())),
        "labels": pa.ListArray.from_arrays(offsets, labels),
        "sizes": pa.ListArray.from_arrays(offsets, pa.array(size_values)),
        "unit": pa.array([f"{url}#{b}" for b in begin.tolist()], pa.string()),
        "bytes": pa.array(np.add.reduceat(size_values, starts) if n else np.zeros(0, np.int64)),
        "columns": pa.array([["", "", ""]] * k, pa.list_(pa.string())),
    }, schema=PLAN_SCHEMA)


def plan(
    url: str, fmt: str, rows_per_shard: int, storage_options: Mapping | None = None, columns: Columns = Columns()
) -> Plan:
    """Deterministic work items (sorted listing) for the dataset at ``url``: one per
    ``rows_per_shard`` folder files or LMDB records, per tar, per Parquet row group (footers are
    read concurrently, and their columns checked)."""
    if fmt == "lmdb":
        return _plan_lmdb(url, rows_per_shard, 0, 0)
    if fmt not in _SUFFIX:
        raise ValueError(f"unknown input format {fmt!r}")
    listing, base = list_input(url, fmt, storage_options)
    if fmt == "folder":
        rel = _relative(listing, base)
        classes = _folder_classes(rel)
        return Plan(_folder_table(url, rel, listing.column("size"), classes, rows_per_shard, 0, 0), classes)
    return Plan(_table(_rows(url, fmt, listing, base, columns, storage_options), 0), [])


def _plan_lmdb(url: str, rows_per_shard: int, first_record: int, first_shard: int) -> Plan:
    if not is_local_url(url):
        raise InputError("LMDB inputs must be on a local filesystem (LMDB maps its file into memory)")
    fs, root = filesystem(url)
    total = lmdb_count(root)
    per_record = sum(i["size"] for i in find(fs, root, detail=True).values()) // max(1, total)
    rows = [dict(kind="lmdb", url=url, start=s, stop=min(s + rows_per_shard, total), unit=f"lmdb#{s}",
                 bytes=per_record * (min(s + rows_per_shard, total) - s))
            for s in range(first_record, total, rows_per_shard)]
    return Plan(_table(rows, first_shard), [])


@dataclass
class Growth:
    """What :func:`extend` found: new work items, and planned inputs that vanished or changed."""

    plan: Plan  # the stored plan with the new items appended
    new_items: int = 0
    new_inputs: int = 0
    new_classes: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def report(self, limit: int = 20) -> dict:
        return {"new_items": self.new_items, "new_inputs": self.new_inputs, "new_classes": self.new_classes,
                "vanished": len(self.vanished), "vanished_examples": self.vanished[:limit],
                "changed": len(self.changed), "changed_examples": self.changed[:limit]}


def _planned(stored: Plan, fmt: str) -> pa.Table:
    """(name, size) of the planned inputs (folder: relative path; tar, Parquet: URL), sizes when planned."""
    t = stored.table
    if fmt == "folder":
        return pa.table({"name": t.column("files").combine_chunks().flatten().cast(pa.large_string()),
                         "size": t.column("sizes").combine_chunks().flatten()})
    sizes = dict(zip(t.column("url").to_pylist(), (s[0] if s else -1 for s in t.column("sizes").to_pylist())))
    return pa.table({"name": pa.array(list(sizes), pa.large_string()), "size": pa.array(list(sizes.values()), pa.int64())})


def extend(stored: Plan, url: str, fmt: str, rows_per_shard: int, storage_options: Mapping | None = None,
           columns: Columns = Columns()) -> Growth:
    """The stored plan plus work items for the inputs that appeared since it was made (numbered
    after the planned ones, so nothing committed is redone or renamed); inputs that vanished or
    changed size are listed, never re-planned. Compared in Arrow, as planning builds."""
    if fmt == "lmdb":
        done = max(stored.table.column("stop").to_pylist(), default=0)
        more = _plan_lmdb(url, rows_per_shard, done, len(stored))
        new = Plan(pa.concat_tables([stored.table, more.table]), [])
        return Growth(new, len(more), sum(i.stop - i.start for i in more))
    listing, base = list_input(url, fmt, storage_options)
    fs, _ = filesystem(url, storage_options)
    if fmt == "folder":
        names = _relative(listing, base)
    else:
        names = pa.array([url_of(fs, p) for p in listing.column("path").to_pylist()], pa.large_string())
    now = pa.table({"name": names, "size": listing.column("size").combine_chunks()})
    planned = _planned(stored, fmt)
    both = planned.join(now, "name", join_type="inner", left_suffix="_planned", right_suffix="_now")
    changed = both.filter(pc.not_equal(both.column("size_planned"), both.column("size_now"))).column("name")
    vanished = pc.filter(planned.column("name"), pc.invert(pc.is_in(planned.column("name"), value_set=now.column("name"))))
    fresh = pc.invert(pc.is_in(names, value_set=planned.column("name")))
    growth = Growth(stored, vanished=sorted(vanished.to_pylist()), changed=sorted(changed.to_pylist()))
    if not pc.any(fresh).as_py():
        return growth
    added = listing.filter(fresh)
    classes = list(stored.classes)
    if fmt == "folder":
        rel = names.filter(fresh)
        if classes:
            first, nested = _first_parts(rel)
            new_classes = sorted(set(pc.unique(first.filter(nested)).to_pylist()) - set(classes))
            classes += new_classes  # appended: the labels already written keep their meaning
            growth.new_classes = new_classes
        table = _folder_table(url, rel, added.column("size"), classes, rows_per_shard, len(stored), stored.inputs())
    else:
        table = _table(_rows(url, fmt, added, base, columns, storage_options), len(stored))
    growth.plan = Plan(pa.concat_tables([stored.table, table]), classes)
    growth.new_items, growth.new_inputs = len(table), len(added)
    return growth
