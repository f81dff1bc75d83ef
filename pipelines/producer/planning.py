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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.contract.storage import call, filesystem, find
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
        table = pq.read_table(pa.BufferReader(data))
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
        found = find(fs, entry["name"].rstrip("/"), detail=True)
        return table([(p, int(i["size"])) for p, i in found.items() if i.get("type") != "directory" and keep(p)])

    with ThreadPoolExecutor(max_workers=LISTINGS_IN_FLIGHT) as pool:
        parts = list(pool.map(below, entries))
    return pa.concat_tables(parts) if parts else table([])


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


_SUFFIX = {"folder": _is_image, "webdataset": lambda p: p.endswith(".tar"), "parquet": lambda p: p.endswith(".parquet")}


def list_input(url: str, fmt: str, storage_options: Mapping | None = None) -> tuple[pa.Table, str]:
    """(files of the input that ``fmt`` reads, as (path, size) sorted; the folder keys are relative
    to). A single-file input is its own listing."""
    fs, root = filesystem(url, storage_options)
    if fmt == "lmdb":
        return pa.table({"path": pa.array([], pa.string()), "size": pa.array([], pa.int64())}), root
    if call(fs, "isfile", root):
        return pa.table({"path": [root], "size": pa.array([call(fs, "size", root)], pa.int64())}), root.rsplit("/", 1)[0]
    return list_files(fs, root, _SUFFIX[fmt]), root


def folder_classes(rel: list[str]) -> list[str]:
    """Class names of an ImageNet-style folder (sorted subfolder names: label i is ``classes[i]``),
    or [] when some image lies directly under the root (then no image is labelled)."""
    if not rel or any("/" not in r for r in rel):
        return []
    return sorted({r.split("/", 1)[0] for r in rel})


def _rel(base: str, path: str) -> str:
    return path[len(base) :].lstrip("/") if path.startswith(base) else path


def _rows(url: str, fmt: str, listing: pa.Table, base: str, rows_per_shard: int, columns: Columns,
          classes: list[str], storage_options) -> list[dict]:
    """Work item rows for ``listing`` (shard names are given by the caller)."""
    fs, _ = filesystem(url, storage_options)
    paths, sizes = listing.column("path").to_pylist(), listing.column("size").to_pylist()
    if fmt == "folder":
        rows = []
        index = {c: i for i, c in enumerate(classes)}
        for s in range(0, len(paths), rows_per_shard):
            rel = [_rel(base, p) for p in paths[s : s + rows_per_shard]]
            labels = [index.get(r.split("/", 1)[0], -1) if "/" in r else -1 for r in rel] if classes else [-1] * len(rel)
            part = sizes[s : s + rows_per_shard]
            rows.append(dict(kind=fmt, url=url, files=rel, labels=labels, sizes=part, unit=None, bytes=sum(part)))
        return rows
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
        row = {**defaults, **{k2: v for k2, v in row.items() if v is not None}, "shard": shard_name(first_shard + k)}
        if row["kind"] == "folder":
            row.update(start=0, stop=len(row["files"]))
        out.append(row)
    return pa.Table.from_pylist(out, schema=PLAN_SCHEMA)


def _number_folder_items(table: pa.Table) -> pa.Table:
    """A folder item's unit is ``<url>#<index of its first file>`` and start/stop its file range."""
    counts = table.column("files").combine_chunks().value_lengths().to_pylist() if table.num_rows else []
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    urls = table.column("url").to_pylist()
    table = table.set_column(table.schema.get_field_index("start"), "start", pa.array(starts, pa.int64()))
    table = table.set_column(table.schema.get_field_index("stop"), "stop", pa.array([s + c for s, c in zip(starts, counts)], pa.int64()))
    return table.set_column(table.schema.get_field_index("unit"), "unit", pa.array([f"{u}#{s}" for u, s in zip(urls, starts)]))


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
    classes = []
    if fmt == "folder":
        classes = _classes_of(listing, base)
    table = _table(_rows(url, fmt, listing, base, rows_per_shard, columns, classes, storage_options), 0)
    return Plan(_number_folder_items(table) if fmt == "folder" else table, classes)


def _classes_of(listing: pa.Table, base: str) -> list[str]:
    seen, top_level = set(), False
    for p in listing.column("path").to_pylist():
        r = _rel(base, p)
        if "/" not in r:
            top_level = True
            break
        seen.add(r.split("/", 1)[0])
    return [] if top_level else sorted(seen)


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


def _planned_inputs(stored: Plan, fmt: str) -> dict[str, int]:
    """Planned input -> its size when planned (folder: relative path; tar/Parquet: URL)."""
    t = stored.table
    if fmt == "folder":
        files = t.column("files").combine_chunks().flatten().to_pylist()
        sizes = t.column("sizes").combine_chunks().flatten().to_pylist()
        return dict(zip(files, sizes))
    return {u: (s[0] if s else -1) for u, s in zip(t.column("url").to_pylist(), t.column("sizes").to_pylist())}


def extend(stored: Plan, url: str, fmt: str, rows_per_shard: int, storage_options: Mapping | None = None,
           columns: Columns = Columns()) -> Growth:
    """The stored plan plus work items for the inputs that appeared since it was made (numbered
    after the planned ones, so nothing committed is redone or renamed); inputs that vanished or
    changed size are listed, never re-planned."""
    if fmt == "lmdb":
        done = max(stored.table.column("stop").to_pylist(), default=0)
        more = _plan_lmdb(url, rows_per_shard, done, len(stored))
        new = Plan(pa.concat_tables([stored.table, more.table]), [])
        return Growth(new, len(more), sum(i.stop - i.start for i in more))
    listing, base = list_input(url, fmt, storage_options)
    planned = _planned_inputs(stored, fmt)
    fs, _ = filesystem(url, storage_options)
    names = [_rel(base, p) if fmt == "folder" else url_of(fs, p) for p in listing.column("path").to_pylist()]
    sizes = listing.column("size").to_pylist()
    now = dict(zip(names, sizes))
    fresh = [i for i, n in enumerate(names) if n not in planned]
    growth = Growth(stored, vanished=sorted(n for n in planned if n not in now),
                    changed=sorted(n for n, s in planned.items() if n in now and now[n] != s))
    if not fresh:
        return growth
    classes = list(stored.classes)
    if fmt == "folder" and classes:
        top = sorted({names[i].split("/", 1)[0] for i in fresh if "/" in names[i]} - set(classes))
        classes += top  # appended: the labels already written keep their meaning
        growth.new_classes = top
    rows = _rows(url, fmt, listing.take(fresh), base, rows_per_shard, columns, classes, storage_options)
    table = _table(rows, len(stored))
    if fmt == "folder":
        table = _number_folder_items(pa.concat_tables([stored.table, table])).slice(len(stored))
    growth.plan = Plan(pa.concat_tables([stored.table, table]), classes)
    growth.new_items, growth.new_inputs = len(table), len(fresh)
    return growth
