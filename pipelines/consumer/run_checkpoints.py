"""A training run's checkpoints: what is saved (model, optimiser, EMA, data position, step), in
which layout (``sharded``: :mod:`pipelines.consumer.sharded_checkpoints`, the default; ``full``:
one file gathered on rank 0, :mod:`pipelines.consumer.checkpoints`), and how a run resumes from
either, with any world size, with or without FSDP."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from pipelines.consumer.checkpoints import latest_step, load_latest, save_checkpoint
from pipelines.consumer.sharded_checkpoints import ShardedCheckpointer, read_train_state
from pipelines.consumer.streaming import TokenDataset
from vfmtok_core.training import EMA

FORMATS = ("sharded", "full")


def _tensors(wrapped: nn.Module, opt: torch.optim.Optimizer, ema: EMA, full: bool) -> dict:
    """Model and optimiser state dicts (FQN keys, also under DDP or FSDP), and the EMA's tensors;
    sharded as the run holds them, or gathered in full on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    return {"model": model, "optimizer": optim, "ema": ema.state_dict() if full else ema.params}


class RunCheckpoints:
    """Checkpoints of one run in ``url``; every rank makes the same calls."""

    def __init__(self, url: str, storage_options: Mapping | None, fmt: str, rank: int, world: int,
                 asynchronous: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint format must be one of {FORMATS}")
        self.url, self.storage_options, self.fmt, self.rank, self.world = url, storage_options, fmt, rank, world
        self.latest = latest_step(url, storage_options)
        self.sharded = ShardedCheckpointer(url, storage_options, rank, asynchronous)
        self._full = None

    def train_state(self) -> dict | None:
        """The newest checkpoint's step, size, fingerprint and data position (None: no checkpoint)."""
        if self.latest is None:
            return None
        if self.latest["format"] == "full":
            self._full = load_latest(self.url, self.storage_options)
            return self._full
        return read_train_state(self.url, self.latest["path"], self.storage_options)

    def restore(self, wrapped: nn.Module, opt: torch.optim.Optimizer, ema: EMA) -> None:
        """Load the newest checkpoint's tensors into the run's model, optimiser and EMA."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if self.latest["format"] == "full":
            state = self._full or load_latest(self.url, self.storage_options)
            set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
            ema.load_state_dict(state["ema"])
            return
        state = _tensors(wrapped, opt, ema, full=False)
        self.sharded.load(self.latest["path"], state)  # in place, resharded to this run's layout
        set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def save(self, step: int, wrapped: nn.Module, opt: torch.optim.Optimizer, ema: EMA, ds: TokenDataset,
             train_state: dict) -> dict:
        """Save (sharded: start saving) ``step``; returns the seconds training was held up and, for
        a full checkpoint, the bytes rank 0 wrote."""
        start, written = time.perf_counter(), 0
        train_state = {**train_state, "data": ds.state_dict(), "step": step, "fingerprint": ds.fingerprint}
        if self.fmt == "sharded":
            self.sharded.save(step, _tensors(wrapped, opt, ema, full=False), train_state)
        else:
            state = _tensors(wrapped, opt, ema, full=True)
            if self.rank == 0:
                _, written = save_checkpoint(self.url, step, {**state, **train_state}, self.storage_options)
            if self.world > 1:
                dist.barrier()
        return {"checkpoint_seconds": time.perf_counter() - start, "checkpoint_bytes": written}

    def poll(self) -> None:
        self.sharded.poll()

    def close(self) -> None:
        """Finish and publish a save still in flight."""
        self.sharded.wait()
