"""Sharded training checkpoints: every rank writes its own shards, in the background, with
``torch.distributed.checkpoint`` (DCP); local disk or any fsspec URL.

``<dir>/step-00001234/`` holds DCP's files (one per rank, and ``.metadata`` written by rank 0 once
every rank's files are in place) and ``train_state.json`` (the step, data position and run
settings). ``<dir>/latest.json`` names the newest complete one and is written only after both, so
a save killed at any point (the process, the node, the store) leaves the previous checkpoint in
charge. No rank ever gathers the whole model: for GPT-3B with AdamW and EMA the full checkpoint is
about 48 GB, which a single-file save would gather on one host while every rank waits.

A checkpoint is restored with any world size, with or without FSDP: DCP reads each tensor's pieces
into whatever sharding the restoring run has. ``jobs.export_gpt`` turns one into the released
single-file layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from pipelines.consumer.checkpoints import LATEST
from pipelines.contract.storage import filesystem, is_local, join, read_json, write_json

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _io(path: str, storage_options: Mapping | None, write: bool):
    """DCP's reader or writer for a local folder or an fsspec URL (options passed to fsspec)."""
    fs, local = filesystem(path, storage_options)
    if is_local(fs):
        return FileSystemWriter(local) if write else FileSystemReader(local)
    opts = dict(storage_options or {})
    return FsspecWriter(path, **opts) if write else FsspecReader(path, **opts)


def _location(url: str, storage_options: Mapping | None, step_path: str) -> str:
    """Where DCP reads or writes ``step_path`` of ``url``: a local folder, or the fsspec URL."""
    fs, root = filesystem(url, storage_options)
    return os.path.join(root, step_path) if is_local(fs) else url.rstrip("/") + "/" + step_path


class ShardedCheckpointer:
    """Saves (asynchronously) and restores sharded checkpoints of one run; every rank calls it.

    A save stages the tensors to host memory, returns, and writes in a background thread on a
    process group of its own (its collectives never interleave with training's). The next save,
    :meth:`poll` once it is done, or :meth:`wait` publishes it: rank 0 writes the step's
    ``train_state.json``, then ``latest.json``."""

    def __init__(self, url: str, storage_options: Mapping | None, rank: int, asynchronous: bool = True):
        self.url, self.storage_options, self.rank = url, dict(storage_options or {}), rank
        self.asynchronous = asynchronous
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.pending = None  # (future, step, train state) of a save not yet published

    def save(self, step: int, state: dict, train_state: dict) -> None:
        """Start saving ``state`` (tensors, possibly sharded) for ``step``; ``train_state`` is JSON."""
        self.wait()
        writer = _io(_location(self.url, self.storage_options, step_name(step)), self.storage_options, write=True)
        common = dict(storage_writer=writer, process_group=self.group, no_dist=not self.distributed)
        if self.asynchronous:
            future = dcp.async_save(state, **common)
        else:
            dcp.save(state, **common)
            future = None
        self.pending = (future, step, train_state)
        if future is None:
            self.wait()

    def poll(self) -> None:
        """Publish the pending save if it has finished (cheap: call it every step)."""
        if self.pending is not None and (self.pending[0] is None or self.pending[0].done()):
            self.wait()

    def wait(self) -> None:
        """Finish the pending save (raising its error, if any) and publish it."""
        if self.pending is None:
            return
        future, step, train_state = self.pending
        self.pending = None
        if future is not None:
            future.result()
        if self.rank == 0:
            fs, root = filesystem(self.url, self.storage_options)
            write_json(fs, join(root, step_name(step), TRAIN_STATE), train_state)
            write_json(fs, join(root, LATEST), {"step": step, "path": step_name(step), "format": "sharded"})
            log.info("checkpoint %s published", join(root, step_name(step)))

    def load(self, step_path: str, state: dict) -> None:
        """Read the checkpoint at ``step_path`` (a ``latest.json`` path) into ``state``'s tensors in
        place, resharded as they are (its train state is :func:`read_train_state`)."""
        reader = _io(_location(self.url, self.storage_options, step_path), self.storage_options, write=False)
        dcp.load(state, storage_reader=reader, process_group=self.group, no_dist=not self.distributed)


def read_train_state(url: str, step_path: str, storage_options: Mapping | None = None) -> dict:
    fs, root = filesystem(url, storage_options)
    return read_json(fs, join(root, step_path, TRAIN_STATE), limit=1 << 24)


def load_for_export(url: str, step_path: str, state: dict, storage_options: Mapping | None = None) -> None:
    """Read a sharded checkpoint into ``state`` (plain tensors, one process, no process group)."""
    reader = _io(_location(url, storage_options, step_path), storage_options, write=False)
    dcp.load(state, storage_reader=reader, no_dist=True)
