"""Run a function over host arrays a batch at a time on a device, results back into a host array.

On CUDA the transfers are taken off the compute's critical path, so the GPU never waits for the host:

- batches are staged in pinned host memory (two slots, alternating) and copied to the device
  non-blocking on a side stream, so the copy of batch i+1 runs while batch i is computed;
- the compute stream waits for a batch's copy with an event (not a host sync), and each device
  batch is marked with ``record_stream`` for the compute stream: it was allocated on the copy stream,
  so without the mark the allocator could hand its memory to the next copy while it is still read;
- results come back non-blocking into pinned memory (two slots), and the host waits for batch i's
  result only after batch i+1 has been enqueued.

Slot reuse rules: the host refills an input slot only after the event of the copy that last read it
(two batches earlier) has passed, and reuses an output slot only after it has read that slot.

On any other device the same schedule runs with plain synchronous copies (no pinning, streams or
events), so its ordering is what the CPU tests check, and its values are the plain loop's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def map_batches(
    fn: Callable[[Batch], torch.Tensor],
    sources: Mapping[str, np.ndarray],
    out: np.ndarray,
    step: int,
    device: str | torch.device,
) -> None:
    """For each ``s`` in ``range(0, len(out), step)``: ``out[s:s+step] = fn(batch)``, where ``batch``
    holds ``sources[name][s:s+step]`` on ``device`` for every name (all sources have ``len(out)`` rows).
    ``fn`` runs on the current stream and returns a tensor whose first dimension is the batch's rows;
    it is cast to ``out.dtype``."""
    if len(out):
        _Feed(sources, step, torch.device(device)).run(fn, out)


class _Feed:
    """The double-buffered schedule of :func:`map_batches` (see the module docstring)."""

    def __init__(self, sources: Mapping[str, np.ndarray], step: int, device: torch.device):
        self.sources = sources
        self.step = step
        self.device = device
        self.cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.cuda else None
        self.copier = torch.cuda.Stream(device) if self.cuda else None
        dtypes = {k: torch.from_numpy(np.empty(0, v.dtype)).dtype for k, v in sources.items()}
        self.staging = [
            {k: torch.empty((step, *v.shape[1:]), dtype=dtypes[k], pin_memory=self.cuda) for k, v in sources.items()}
            for _ in range(2)
        ]
        self.staging_read: list[torch.cuda.Event | None] = [None, None]  # the copy that last read each slot
        self.results: list[torch.Tensor] = []  # two host slots, made at the first result's shape

    def _event(self, stream) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def upload(self, index: int, start: int, rows: int) -> tuple[Batch, torch.cuda.Event | None]:
        """Stage batch ``index`` in its host slot and enqueue its copy on the side stream."""
        slot = index % 2
        if self.staging_read[slot] is not None:
            self.staging_read[slot].synchronize()
        staged = {k: t[:rows] for k, t in self.staging[slot].items()}
        for k, t in staged.items():
            t.numpy()[...] = self.sources[k][start : start + rows]
        with torch.cuda.stream(self.copier) if self.cuda else contextlib.nullcontext():
            batch = {k: t.to(self.device, non_blocking=self.cuda) for k, t in staged.items()}
            copied = self._event(self.copier)
        self.staging_read[slot] = copied
        return batch, copied

    def download(self, index: int, result: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Enqueue the copy of batch ``index``'s result into its host slot on the compute stream."""
        if not self.results:
            self.results = [
                torch.empty((self.step, *result.shape[1:]), dtype=result.dtype, pin_memory=self.cuda) for _ in range(2)
            ]
        host = self.results[index % 2][: len(result)]
        host.copy_(result, non_blocking=self.cuda)
        return host, self._event(self.compute)

    def run(self, fn: Callable[[Batch], torch.Tensor], out: np.ndarray) -> None:
        n = len(out)
        starts = list(range(0, n, self.step))
        upcoming = self.upload(0, 0, min(self.step, n))
        pending = None  # (start, host result, its event) of the previous batch
        for i, s in enumerate(starts):
            batch, copied = upcoming
            if self.cuda:
                self.compute.wait_event(copied)
                for t in batch.values():
                    t.record_stream(self.compute)
            host, ready = self.download(i, fn(batch))
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                upcoming = self.upload(i + 1, nxt, min(self.step, n - nxt))
            if pending is not None:
                self._drain(*pending, out)
            pending = (s, host, ready)
        self._drain(*pending, out)

    @staticmethod
    def _drain(start: int, host: torch.Tensor, ready: torch.cuda.Event | None, out: np.ndarray) -> None:
        if ready is not None:
            ready.synchronize()
        out[start : start + len(host)] = host.numpy()
