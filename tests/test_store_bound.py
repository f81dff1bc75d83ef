"""The object store holds a bounded number of crop bytes however far the tokenizers fall behind:
the job's executor with a slow tokenizer stand-in, the store's use read from Ray itself while it
runs. Small PNGs make 336 px crops many times their input bytes, as thumbnails do."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from pipelines.producer.images import DEFAULT_MAX_PIXELS, expand_variants
from pipelines.producer.planning import plan
from pipelines.producer.ray_tokenize import CHUNKS_AHEAD, chunk_bound, run_items, start_committers
from pipelines.ray_runtime import ray_session
from tests.pipeline_data import write_folder

SIZE, IMAGES, ROWS = 336, 192, 48
VARIANTS = expand_variants(("center", "flip"))


@pytest.fixture(scope="module")
def ray():
    # Ray deletes freed objects in batches, once a second by default: an encoded chunk would stay
    # counted in the store's figure for up to a second after it was freed. Every 50 ms here, so
    # that the figure shows what the executor holds.
    import os

    os.environ["RAY_free_objects_period_milliseconds"] = "50"
    try:
        with ray_session(num_cpus=2) as ray:
            yield ray
    finally:
        del os.environ["RAY_free_objects_period_milliseconds"]


class SlowTokenizer:
    """Stands in for a tokenizer slower than the decoders: zeros as codes, 0.1 s a call."""

    def encode(self, sources: dict, variants: tuple[str, ...]) -> np.ndarray:
        time.sleep(0.1)
        n = len(next(iter(sources.values()))) if sources else 0
        return np.zeros((n, len(variants), 256), np.uint16)


def _run(ray, tmp_path, name: str, max_store_bytes: int, chunk_bytes: int) -> tuple[dict, int]:
    """(the run's stats, the most object store MiB Ray reported while it ran)."""
    from ray._private.internal_api import memory_summary

    items = plan(str(tmp_path / "in"), "folder", ROWS)
    actor = ray.remote(SlowTokenizer).options(num_cpus=0).remote()
    committers = start_committers()
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            used = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
            peak[0] = max(peak[0], int(used.group(1)) if used else 0)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stats = run_items(items, actors=[actor], committers=committers, image_size=SIZE, output=str(tmp_path / name),
                          fmt="parquet", variants=VARIANTS, max_pixels=DEFAULT_MAX_PIXELS, storage_options=None,
                          max_decoding=2, max_bytes_in_flight=1 << 30, max_store_bytes=max_store_bytes,
                          chunk_bytes=chunk_bytes)
    finally:
        done.set()
        watcher.join()
        for a in [actor, *committers]:
            ray.kill(a)
    return stats, peak[0]


def test_crops_waiting_for_a_slow_tokenizer_stay_within_the_store_budget(ray, tmp_path):
    write_folder(tmp_path / "in", classes=4, per_class=IMAGES // 4)
    chunk = 8 * SIZE * SIZE * 3  # 8 crops, 2.7 MB; the whole input makes 24 chunks, 65 MB
    bound = chunk_bound(SIZE, VARIANTS, chunk, 1)
    assert bound == chunk
    loose, loose_peak = _run(ray, tmp_path, "loose", 1 << 40, chunk)
    tight, tight_peak = _run(ray, tmp_path, "tight", 3 * bound, chunk)
    assert loose.images == tight.images == IMAGES and loose.shards == tight.shards == IMAGES // ROWS
    assert tight.peak_store_bytes <= 3 * bound < loose.peak_store_bytes
    # Ray's own figure: the budget, plus the chunks each of the 2 decoding items may hold untaken
    # (and 1 MiB of rounding); without a budget most of the input's crops pile up.
    limit = (3 + 2 * (CHUNKS_AHEAD + 1)) * bound / 2**20 + 1
    assert tight_peak <= limit < loose_peak, (tight_peak, limit, loose_peak)
