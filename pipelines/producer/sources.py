"""Input datasets, split into deterministic work items that each become one output shard.

Supported layouts (any fsspec URL unless noted):

- ``folder``: image files; ImageNet-style class subfolders give labels (sorted names -> 0..C-1),
  images directly under the root have none. Keys are paths relative to the root.
- ``webdataset``: ``.tar`` shards; an image member (jpg/png/webp/...) and an optional ``cls``.
  Keys are ``<tar path relative to root, without .tar>/<__key__>``.
- ``parquet``: an image column (raw bytes or the Hugging Face ``{bytes, path}`` struct), optional
  label and key columns. Keys are ``<file stem>/<key or row index>``; one work item per row group.
- ``lmdb`` (local path): VFMTok's layout, ``num_samples`` then ``str(i)`` -> a pickled
  ``{'image': bytes, 'label': int}``, unpickled by a loader that admits only plain types.

Keys are made unique per input unit so two files can never collide; a key repeated inside one
unit is rejected as ``duplicate_key`` (the first occurrence wins).

Inputs are untrusted. Every sample passes the same checks before it is decoded, and a failing one
is a recorded rejection, never an exception that stops the item: keys must be short, printable
UTF-8 and relative (no ``..``, no leading ``/``: they become member names in WebDataset output);
labels must fit int32; a folder file or tar member may hold at most ``MAX_INPUT_BYTES`` (never read past);
tar members that are links or carry unsafe names are refused; a folder file whose real path leaves
the input root (a symlink pointing out) is refused, never read.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import tarfile
import unicodedata
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipelines.contract.retry import is_storage_fault
from pipelines.contract.storage import TooLarge, call, filesystem, is_local, join, open_input, read_bytes, read_many

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "jfif")
FORMATS = ("folder", "webdataset", "parquet", "lmdb")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
LABEL_COLUMNS = ("label", "cls", "class", "labels")
KEY_COLUMNS = ("key", "__key__", "id", "image_id")
MAX_INPUT_BYTES = 256 << 20  # one encoded image; far above any real photo, far below a memory problem
MAX_KEY_BYTES = 1024
MAX_LABEL_BYTES = 32  # a WebDataset ``cls`` member: an integer in text
INT32 = (-(2**31), 2**31 - 1)
DETECT_LISTINGS = 32  # folders listed at most to detect an input's layout
FOLDER_READS_IN_FLIGHT = 16  # GETs a task keeps open reading a remote folder (also bounded per process)


class InputError(ValueError):
    """The input cannot be used as given (missing, unknown layout, no image column): a user mistake."""


@dataclass(frozen=True)
class WorkItem:
    """One unit of work; ``shard`` names the output shard it becomes."""

    shard: str
    kind: str
    url: str  # file (webdataset, parquet), or root (folder, lmdb)
    start: int = 0  # folder: file range; parquet: row group; lmdb: index range
    stop: int = 0
    files: tuple[str, ...] = field(default_factory=tuple)  # folder: relative paths
    labels: tuple[int, ...] = field(default_factory=tuple)  # folder: their labels (-1: none)
    unit: str = ""  # human-readable source name recorded in each row's ``source``
    bytes: int = 0  # input bytes the item reads (folder: its files; tar: the file; parquet: the row group)
    columns: tuple[str, str, str] = ("", "", "")  # parquet: the (image, label, key) columns read; "": none
    sizes: tuple[int, ...] = ()  # sizes when planned (folder: each file; tar, parquet: the file); () unchecked

    @staticmethod
    def from_dict(d: dict) -> "WorkItem":
        return WorkItem(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Columns:
    """Parquet columns named by the user (None: found by name, see ``*_COLUMNS``)."""

    image: str | None = None
    label: str | None = None
    key: str | None = None

    def resolve(self, names: list[str], where: str) -> tuple[str, str, str]:
        """(image, label, key) column names of a file with columns ``names``; "" for an absent
        optional one. A named column that is missing, or no image column at all, is an InputError."""
        out = []
        for what, given, candidates in (("image", self.image, IMAGE_COLUMNS), ("label", self.label, LABEL_COLUMNS),
                                         ("key", self.key, KEY_COLUMNS)):
            if given is not None and given not in names:
                raise InputError(f"{where} has no column {given!r} (--{what}-column); it has {', '.join(names)}")
            out.append(given if given is not None else (_pick(names, candidates) or ""))
        if not out[0]:
            raise InputError(f"{where} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has "
                             f"{', '.join(names)}); name it with --image-column")
        return out[0], out[1], out[2]


@dataclass
class RawSample:
    key: str
    source: str
    label: int | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, message) when the sample is unreadable


def detect_format(url: str, storage_options: Mapping | None = None) -> str:
    """The input's layout, from its top level and, where that holds only folders, the first few
    folders below (breadth first, a bounded number of listings: a 14M-file input is not listed
    whole just to learn that it holds JPEGs)."""
    fs, root = filesystem(url, storage_options)
    if call(fs, "isfile", root):
        for fmt, suffix in (("webdataset", ".tar"), ("parquet", ".parquet")):
            if root.endswith(suffix):
                return fmt
        raise InputError(f"cannot tell the format of {url}; pass --input-format")
    if not call(fs, "exists", root):
        raise InputError(f"{url} does not exist or is empty")
    folders, listed = [root], 0
    while folders and listed < DETECT_LISTINGS:
        entries = call(fs, "ls", folders.pop(0), detail=True)
        listed += 1
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] != "directory"]
        if "data.mdb" in names:
            return "lmdb"
        for fmt, found in (("webdataset", lambda n: n.endswith(".tar")), ("parquet", lambda n: n.endswith(".parquet")),
                           ("folder", lambda n: n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)):
            if any(map(found, names)):
                return fmt
        folders += sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory" and e["name"].rstrip("/") != root)
    raise InputError(f"found no images, .tar, .parquet or LMDB under {url} (looked in {listed} folders); "
                     "pass --input-format if they lie deeper")


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def url_of(fs, path: str) -> str:
    """The URL of ``path`` on ``fs`` (a local path stays a path)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def read_item(item: WorkItem, storage_options: Mapping | None = None) -> Iterator[RawSample]:
    """The samples of one work item in a fixed order; unreadable ones carry ``error``."""
    readers = {"folder": _read_folder, "webdataset": _read_tar, "parquet": _read_parquet, "lmdb": _read_lmdb}
    seen: set[str] = set()
    for sample in readers[item.kind](item, storage_options):
        problem = key_problem(sample.key)
        if sample.error is not None:
            if problem:  # keep the reason, but never record a hostile key verbatim
                sample = RawSample(_printable(sample.key), sample.source, error=sample.error)
        elif problem:
            sample = RawSample(_printable(sample.key), sample.source, error=("bad_key", problem))
        elif sample.label is not None and not INT32[0] <= sample.label <= INT32[1]:
            sample = RawSample(sample.key, sample.source, error=("bad_label", f"label {sample.label} does not fit int32"))
        elif sample.key in seen:
            sample = RawSample(sample.key, sample.source, error=("duplicate_key", f"key {sample.key!r} repeats in {item.unit}"))
        else:
            seen.add(sample.key)  # the first accepted occurrence wins
        yield sample


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a sample (None when it can). Keys become Parquet strings and
    WebDataset member names that users extract: they must be UTF-8, printable and relative."""
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        return "key is not valid UTF-8"
    if not raw:
        return "empty key"
    if len(raw) > MAX_KEY_BYTES:
        return f"key is {len(raw)} bytes long (limit {MAX_KEY_BYTES})"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in key):
        return f"key {_printable(key)!r} holds control or unassigned characters"
    if key.startswith("/") or ".." in key.split("/"):
        return f"key {_printable(key)!r} is an absolute path or climbs out with '..'"
    return None


def _printable(key: str, limit: int = 200) -> str:
    """A loggable form of a hostile key: escaped and cut short."""
    return key.encode("unicode_escape").decode("ascii")[:limit]


def parquet_footer(fs, path: str, columns: "Columns") -> tuple[tuple[str, str, str], list[int]]:
    """(the image, label and key columns of a Parquet file, its row groups' byte sizes); a file
    that is not Parquet, or lacks the columns, is an :class:`InputError` (a user mistake, found in
    planning rather than by every task)."""
    with open_input(fs, path, block_bytes=1 << 20) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - any unreadable footer is the input's fault
            if is_storage_fault(e):
                raise
            raise InputError(f"{url_of(fs, path)} is not a readable Parquet file: {type(e).__name__}: {e}") from None
        cols = columns.resolve(pf.schema_arrow.names, url_of(fs, path))
        return cols, [pf.metadata.row_group(g).total_byte_size for g in range(pf.num_row_groups)]


def _changed(item: WorkItem, fs, path: str) -> tuple[int | None, RawSample | None]:
    """(the file's size now, and a rejection when it differs from the planned size). A file that
    changed since planning would mix new content into a plan made from the old: it is refused."""
    if not item.sizes:
        return None, None
    size = call(fs, "size", path)
    if size == item.sizes[0]:
        return size, None
    return size, RawSample(f"{item.unit}/<file>", item.unit, error=(
        "changed", f"{url_of(fs, path)} is {size} bytes, {item.sizes[0]} when planned"))


class _Containment:
    """Whether a local path resolves inside ``root``, links followed, as cheaply as a per-image
    check can be: a folder's resolution is kept (an item's files share a few folders) and the file
    itself is resolved only when it is a link."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.folders: dict[str, bool] = {}

    def _within(self, path: str) -> bool:
        return os.path.commonpath([self.root, os.path.realpath(path)]) == self.root

    def __call__(self, path: str) -> bool:
        folder = os.path.dirname(path)
        if folder not in self.folders:
            self.folders[folder] = self._within(folder)
        if not self.folders[folder]:
            return False
        try:
            linked = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            return True  # missing: the read reports it
        return not linked or self._within(path)


def _read_folder(item: WorkItem, storage_options) -> Iterator[RawSample]:
    """The item's files in plan order. On an object store they are fetched many at a time (one GET
    each, up to ``FOLDER_READS_IN_FLIGHT`` ahead of the decoder), so per-request latency is paid
    once per wave, not once per image; a local disk is read in order."""
    fs, root = filesystem(item.url, storage_options)
    inside = _Containment(root) if is_local(fs) else None
    planned = item.sizes or (None,) * len(item.files)

    def load(rel: str, label: int, size: int | None, fetched: Future | None = None) -> RawSample:
        key = rel.rsplit(".", 1)[0]
        path = join(root, rel)
        if inside is not None and not inside(path):
            return RawSample(key, rel, error=("outside_root", f"{rel} resolves to a path outside the input folder"))
        try:
            data = read_bytes(fs, path, MAX_INPUT_BYTES) if fetched is None else fetched.result()
        except TooLarge as e:
            return RawSample(key, rel, error=("too_large", str(e)))
        except OSError as e:
            if is_storage_fault(e):
                raise  # the store's weather, not the input's fault: retried, never a rejection
            return RawSample(key, rel, error=("read_error", f"{type(e).__name__}: {e}"))
        if size is not None and len(data) != size:
            return RawSample(key, rel, error=("changed", f"{rel} is {len(data)} bytes, {size} when planned"))
        return RawSample(key, rel, None if label < 0 else label, data)

    if is_local(fs):
        yield from map(load, item.files, item.labels, planned)
        return
    fetched = read_many(fs, (join(root, rel) for rel in item.files), MAX_INPUT_BYTES, FOLDER_READS_IN_FLIGHT)
    yield from map(load, item.files, item.labels, planned, fetched)


def _read_tar(item: WorkItem, storage_options) -> Iterator[RawSample]:
    """Group consecutive members by WebDataset key (basename up to its first dot)."""
    fs, path = filesystem(item.url, storage_options)
    current: dict[str, bytes | None] = {}
    current_key = None

    def flush(key: str, files: dict[str, bytes | None]) -> RawSample:
        name = f"{item.unit}/{key}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        label = None
        if "cls" in files and files["cls"] is None:
            return RawSample(name, item.unit, error=("bad_label", f"cls member is over {MAX_LABEL_BYTES} bytes"))
        if "cls" in files:
            try:
                label = int(files["cls"].decode().strip())
            except ValueError:
                return RawSample(name, item.unit, error=("bad_label", f"cls {files['cls'][:20]!r} is not an integer"))
        if image_ext is None:
            return RawSample(name, item.unit, error=("no_image", f"members {sorted(files)} hold no image"))
        return RawSample(name, item.unit, label, files[image_ext])

    size, refusal = _changed(item, fs, path)
    if refusal is not None:
        yield refusal
        return
    try:
        with open_input(fs, path, size=size) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{dirname}/{stem}" if dirname else stem
                refusal = _member_problem(member)
                if refusal is not None:  # its data is skipped by the stream, never read
                    yield RawSample(f"{item.unit}/{_printable(key)}", item.unit, error=refusal)
                    continue
                if current_key is not None and key != current_key:
                    yield flush(current_key, current)
                    current = {}
                current_key = key
                if ext.lower() == "cls" and member.size > MAX_LABEL_BYTES:
                    current["cls"] = None  # refused unread; rejects the whole sample in flush()
                else:
                    current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if is_storage_fault(e):
            raise
        yield RawSample(f"{item.unit}/<tar>", item.unit, error=("corrupt_tar", f"{type(e).__name__}: {e}"))
        return
    if current_key is not None:
        yield flush(current_key, current)


def _member_problem(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(reason, message) for a tar member we refuse to read, else None."""
    if not member.isfile():
        return "not_a_file", f"member {_printable(member.name)!r} is a link or special file"
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        return "unsafe_name", f"member {_printable(name)!r} is absolute or climbs out with '..'"
    ext = name.rpartition("/")[2].partition(".")[2].lower()
    if ext != "cls" and member.size > MAX_INPUT_BYTES:
        return "too_large", f"member {_printable(name)!r} is {member.size} bytes (limit {MAX_INPUT_BYTES})"
    return None


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _read_parquet(item: WorkItem, storage_options) -> Iterator[RawSample]:
    fs, path = filesystem(item.url, storage_options)
    size, refusal = _changed(item, fs, path)
    if refusal is not None:
        yield refusal
        return
    with open_input(fs, path, size=size) as f:
        pf = pq.ParquetFile(f)
        # Planned columns; a plan from before they were recorded finds them by name as planning did.
        image_col, label_col, key_col = item.columns if item.columns[0] else Columns().resolve(pf.schema_arrow.names, item.url)
        cols = [c for c in (image_col, label_col, key_col) if c]
        table = pf.read_row_group(item.start, columns=cols)
        offset = sum(pf.metadata.row_group(g).num_rows for g in range(item.start))
    images = table.column(image_col).to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(images)
    keys = table.column(key_col).to_pylist() if key_col else [None] * len(images)
    for i, (img, label, key) in enumerate(zip(images, labels, keys)):
        name = f"{item.unit}/{key if key is not None else offset + i}"
        if isinstance(img, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            img = img.get("bytes")
        if img is None:
            yield RawSample(name, item.unit, error=("empty", "null image"))
            continue
        yield RawSample(name, item.unit, None if label is None else int(label), bytes(img))


class _PlainUnpickler(pickle.Unpickler):
    """Admits only builtin containers and scalars: any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dicts, bytes and ints are allowed")


def lmdb_count(root: str) -> int:
    import lmdb

    with lmdb.open(root, readonly=True, lock=False, readahead=False, meminit=False, subdir=True) as env:
        with env.begin() as txn:
            raw = txn.get(b"num_samples")
    if raw is None:
        raise ValueError(f"{root} has no num_samples key; not VFMTok's LMDB layout")
    return int(raw.decode())


def _read_lmdb(item: WorkItem, storage_options) -> Iterator[RawSample]:
    import lmdb

    with lmdb.open(item.url, readonly=True, lock=False, readahead=False, meminit=False, subdir=True) as env:
        with env.begin() as txn:
            for i in range(item.start, item.stop):
                key = str(i)
                raw = txn.get(key.encode())
                if raw is None:
                    yield RawSample(key, item.unit, error=("missing", f"LMDB has no key {key!r}"))
                    continue
                try:
                    rec = _PlainUnpickler(io.BytesIO(raw)).load()
                    data, label = rec["image"], rec.get("label")
                    if not isinstance(data, (bytes, bytearray)) or not (label is None or isinstance(label, int)):
                        raise TypeError("expected {'image': bytes, 'label': int}")
                except Exception as e:  # noqa: BLE001 - any malformed record is a rejection
                    yield RawSample(key, item.unit, error=("bad_record", f"{type(e).__name__}: {e}"))
                    continue
                yield RawSample(key, item.unit, label, bytes(data))


def sha256(data: bytes | None) -> bytes:
    return hashlib.sha256(data or b"").digest()
