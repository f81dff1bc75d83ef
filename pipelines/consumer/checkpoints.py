"""Training checkpoints on local disk or any fsspec URL, written atomically.

``<dir>/step-00001234.pt`` holds everything a resume needs (the ``full`` layout; the ``sharded``
one is :mod:`pipelines.consumer.sharded_checkpoints`); ``<dir>/latest.json`` names the newest
checkpoint of either layout and is written after it, so a crash mid-save leaves the previous
checkpoint in charge.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import torch

from pipelines.contract.storage import atomic_write, exists, filesystem, join, read_bytes, read_json, write_json

LATEST = "latest.json"


def save_checkpoint(url: str, step: int, state: dict, storage_options: Mapping | None = None) -> tuple[str, int]:
    """Write ``state`` as ``step-NNNNNNNN.pt``, then point ``latest.json`` at it; returns (its
    path, its bytes)."""
    fs, root = filesystem(url, storage_options)
    name = f"step-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(fs, join(root, name), buf.getvalue())
    write_json(fs, join(root, LATEST), {"step": step, "path": name})
    return join(root, name), buf.getbuffer().nbytes


def latest_step(url: str, storage_options: Mapping | None = None) -> dict | None:
    """``latest.json`` of a checkpoint folder (``{"step", "path", "format"}``, the format ``full``
    or ``sharded``), or None when there is no checkpoint yet. A path that is not a checkpoint of
    this folder (``../``, another name) is refused."""
    fs, root = filesystem(url, storage_options)
    if not exists(fs, join(root, LATEST)):
        return None
    latest = read_json(fs, join(root, LATEST), limit=1 << 16)
    if not re.fullmatch(r"step-\d{8}(\.pt)?", str(latest.get("path"))):
        raise ValueError(f"{LATEST} in {url} names {latest.get('path')!r}, not a checkpoint of this folder")
    latest.setdefault("format", "full" if latest["path"].endswith(".pt") else "sharded")
    return latest


def load_latest(url: str, storage_options: Mapping | None = None) -> dict | None:
    """The newest full checkpoint's state (tensors on the CPU), or None when there is none yet."""
    latest = latest_step(url, storage_options)
    if latest is None:
        return None
    if latest["format"] != "full":
        raise ValueError(f"the newest checkpoint in {url} is sharded: export it with jobs.export_gpt")
    fs, root = filesystem(url, storage_options)
    data = read_bytes(fs, join(root, latest["path"]))
    # Our own files: weights, optimiser state and plain Python values only.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
