"""The batch feed's schedule (two staging and two result slots, results drained one batch late)
against a plain loop, on the CPU, where it runs with plain copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.producer.device_feed import map_batches


def _sources(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "center": rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8),
        "tencrop": rng.integers(0, 256, (n, 7, 7, 3), dtype=np.uint8),
    }


def _codes(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: (sum of 'center', first pixel of 'tencrop' times 300), large enough to need uint16."""
    center = batch["center"].long().flatten(1).sum(1)
    first = batch["tencrop"][:, 0, 0, 0].long() * 300
    return torch.stack([center, first], dim=1)


@pytest.mark.parametrize("n, step", [(11, 4), (9, 3), (1, 4), (5, 1)])
def test_values_equal_the_plain_loop(n, step):
    sources = _sources(n)
    seen = []

    def fn(batch):
        seen.append({k: v.numpy().copy() for k, v in batch.items()})
        return _codes(batch)

    out = np.full((n, 2), 7, np.uint16)
    map_batches(fn, sources, out, step, "cpu")

    plain = _codes({k: torch.from_numpy(v) for k, v in sources.items()}).numpy().astype(np.uint16)
    np.testing.assert_array_equal(out, plain)
    assert int(out[:, 1].max()) > 255  # the cast to uint16 kept values above a byte
    # fn saw each batch once, in order, with exactly the rows of its slice (the last one short).
    starts = list(range(0, n, step))
    assert [len(b["center"]) for b in seen] == [min(step, n - s) for s in starts]
    for s, batch in zip(starts, seen):
        for k, v in sources.items():
            np.testing.assert_array_equal(batch[k], v[s : s + step])


def test_results_are_copied_before_their_slot_is_reused():
    """fn returns a view of its input batch (on the CPU, the staging slot itself): each result must
    be copied out before that slot is refilled two batches later, or the output shows a later batch."""
    sources = _sources(10)
    out = np.zeros((10, 5, 6, 3), np.uint8)
    map_batches(lambda b: b["center"], sources, out, 3, "cpu")
    np.testing.assert_array_equal(out, sources["center"])


def test_empty_input_calls_nothing():
    out = np.zeros((0, 2), np.uint16)
    map_batches(lambda b: pytest.fail("fn called"), _sources(0), out, 4, "cpu")
