"""Token shard formats (writers and the reader): what users and the trainer read with standard libraries.

Parquet, one row per source image:
    key string, label int32 (null when unknown), tokens fixed_size_list<uint16>[V*256] (row-major by
    variant), source string, sha256 fixed_size_binary(32) of the source bytes.
WebDataset tar, one sample per image:
    ``<key>.tokens.npy`` uint16 (V, 256), ``<key>.cls`` when labelled, ``<key>.json`` with the metadata.

Rejected inputs go to Parquet files with key, source, reason and error text.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
SHARD_FORMATS = ("parquet", "webdataset")
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("error", pa.string())])


def token_schema(tokens_per_row: int) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("label", pa.int32()),
            ("tokens", pa.list_(pa.uint16(), tokens_per_row)),
            ("source", pa.string()),
            ("sha256", pa.binary(32)),
        ]
    )


@dataclass
class ShardRows:
    keys: list[str]
    labels: list[int | None]
    sources: list[str]
    digests: list[bytes]
    tokens: np.ndarray  # (N, V, T) uint16

    def __len__(self) -> int:
        return len(self.keys)


def parquet_bytes(rows: ShardRows) -> bytes:
    n, v, t = rows.tokens.shape if len(rows) else (0, *rows.tokens.shape[1:])
    flat = pa.array(np.ascontiguousarray(rows.tokens, dtype=np.uint16).reshape(-1), type=pa.uint16())
    table = pa.Table.from_arrays(
        [
            pa.array(rows.keys, pa.string()),
            pa.array(rows.labels, pa.int32()),
            pa.FixedSizeListArray.from_arrays(flat, v * t),
            pa.array(rows.sources, pa.string()),
            pa.array(rows.digests, pa.binary(32)),
        ],
        schema=token_schema(v * t),
    )
    buf = io.BytesIO()
    # Parquet stores uint16 as 32-bit integers. Splitting the token column into byte streams lets
    # zstd drop the two zero bytes and squeeze the sparse third: uniformly random 14-bit tokens take
    # ~450 bytes per 256, skewed real ones far less. (Dictionary encoding does worse here.)
    pq.write_table(
        table,
        buf,
        compression="zstd",
        use_dictionary=["source"],
        column_encoding={"tokens.list.element": "BYTE_STREAM_SPLIT"},
    )
    return buf.getvalue()


def _wds_name(key: str) -> str:
    # WebDataset splits a member name at the first dot of its basename; keep dots out of keys.
    return key.replace(".", "_")


def webdataset_bytes(rows: ShardRows, variants: tuple[str, ...]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))

        for i, key in enumerate(rows.keys):
            name = _wds_name(key)
            npy = io.BytesIO()
            np.save(npy, np.ascontiguousarray(rows.tokens[i], dtype=np.uint16))
            add(f"{name}.tokens.npy", npy.getvalue())
            if rows.labels[i] is not None:
                add(f"{name}.cls", str(rows.labels[i]).encode())
            meta = {
                "key": key,
                "label": rows.labels[i],
                "source": rows.sources[i],
                "sha256": rows.digests[i].hex(),
                "variants": list(variants),
            }
            add(f"{name}.json", json.dumps(meta).encode())
    return buf.getvalue()


def rejects_bytes(rejects: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def decode_shard(data: bytes, fmt: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shard bytes -> (keys, labels int64 with -1 for unknown, tokens uint16 (N, V*T))."""
    if fmt == "parquet":
        # ParquetFile, not read_table: see Plan.from_parquet for why.
        table = pq.ParquetFile(io.BytesIO(data)).read(columns=["key", "label", "tokens"], use_threads=False)
        tokens = table.column("tokens").combine_chunks()
        width = tokens.type.list_size
        arr = tokens.flatten().to_numpy().reshape(-1, width)
        labels = table.column("label").to_numpy(zero_copy_only=False)
        labels = np.where(np.isnan(labels.astype(np.float64)), -1, labels).astype(np.int64)
        return table.column("key").to_pylist(), labels, arr
    keys, labels, rows = [], [], []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar}
        for name, m in members.items():
            if name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                base = name[: -len(".json")]
                keys.append(meta["key"])
                labels.append(-1 if meta["label"] is None else int(meta["label"]))
                rows.append(np.load(io.BytesIO(tar.extractfile(members[base + ".tokens.npy"]).read())).reshape(-1))
    return keys, np.asarray(labels, np.int64), np.stack(rows).astype(np.uint16)
