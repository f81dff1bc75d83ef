"""The streaming dataset: exactly once per epoch for any world size and worker count, exact
mid-epoch resume (also across world sizes), variants, refusals, corrupt shards, S3."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.consumer.streaming import DatasetMismatch, ShardError, TokenDataset, TokenLoader
from tests.pipeline_data import make_token_dataset as make_dataset


@pytest.fixture()
def dataset(tmp_path):
    return tmp_path / "ds", make_dataset(tmp_path / "ds")


def _keys(url, world, workers=0, batch=4, seed=0, epoch=0, state=None):
    out = []
    for rank in range(world):
        ds = TokenDataset(str(url), seed=seed, rank=rank, world_size=world)
        if state:
            ds.load_state_dict(state)
        ds.set_epoch(epoch)
        for b in TokenLoader(ds, batch_size=batch, num_workers=workers):
            out += b["key"]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 4])
def test_exactly_once_per_epoch(dataset, world, workers):
    url, keys = dataset
    got = _keys(url, world, workers)
    assert Counter(got) == Counter(keys)


def test_reshuffled_each_epoch_and_deterministic(dataset):
    url, keys = dataset
    e0, e1 = _keys(url, 1, epoch=0), _keys(url, 1, epoch=1)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(keys)
    assert e0 == _keys(url, 1, epoch=0)
    assert _keys(url, 1, seed=1) != e0
    ordered = TokenDataset(str(url), shuffle=False, rank=0, world_size=1)
    assert [s["key"] for s in ordered] == keys


def test_tokens_labels_and_variant_choice(dataset):
    url, keys = dataset
    ds = TokenDataset(str(url), rank=0, world_size=1)
    chosen = Counter()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for s in ds:
            n = int(s["key"][3:])
            v = ds.variant_of(s["key"])
            assert s["tokens"].dtype == torch.int64 and s["tokens"].shape == (256,)
            assert int(s["tokens"][0]) == (n * 10 + v) % 1024 and s["label"] == n % 5
            chosen[v] += 1
    assert set(chosen) == {0, 1}


def _split_run(url, world_a, world_b, workers, steps_a, batch=3):
    """Global sample sequence of an epoch: ``steps_a`` batches at world_a, then resume at world_b."""
    seen, state = [], None
    loaders = []
    for rank in range(world_a):
        ds = TokenDataset(str(url), seed=5, rank=rank, world_size=world_a)
        loaders.append((ds, iter(TokenLoader(ds, batch_size=batch, num_workers=workers))))
    for _ in range(steps_a):
        for ds, it in loaders:
            seen += next(it)["key"]
    state = loaders[0][0].state_dict()
    assert state["consumed"] == steps_a * batch * world_a
    rest = []
    for rank in range(world_b):
        ds = TokenDataset(str(url), seed=0, rank=rank, world_size=world_b)
        ds.load_state_dict(json.loads(json.dumps(state)))
        rest += [k for b in TokenLoader(ds, batch_size=batch, num_workers=workers) for k in b["key"]]
    return seen, rest


@pytest.mark.parametrize("world_a,world_b,workers", [(1, 1, 0), (2, 2, 2), (2, 3, 0), (2, 3, 2)])
def test_mid_epoch_resume_continues_the_uninterrupted_sequence(dataset, world_a, world_b, workers):
    url, keys = dataset
    seen, rest = _split_run(url, world_a, world_b, workers, steps_a=4)
    full = TokenDataset(str(url), seed=5, rank=0, world_size=1).epoch_order()
    names = np.array(keys)
    assert sorted(seen) == sorted(names[full[: len(seen)]].tolist())  # consumed a prefix
    assert sorted(rest) == sorted(names[full[len(seen):]].tolist())  # and exactly the remainder
    assert Counter(seen + rest) == Counter(keys)


def test_fingerprint_and_vocab_refusals(dataset):
    url, _ = dataset
    with pytest.raises(DatasetMismatch, match="tokenized by tiny-abc"):
        TokenDataset(str(url), expected_fingerprint="vfmtok-l14-336-0000")
    with pytest.raises(DatasetMismatch, match="codebook size 1024"):
        TokenDataset(str(url), vocab_size=16384)
    ds = TokenDataset(str(url), expected_fingerprint="tiny-abc", vocab_size=1024)
    with pytest.raises(DatasetMismatch):
        ds.load_state_dict({"seed": 0, "epoch": 0, "consumed": 0, "fingerprint": "other"})


def test_corrupt_or_missing_shard(dataset):
    url, keys = dataset
    shard = url / "shards" / "shard-000002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ShardError, match="shard-000002"):
        list(TokenDataset(str(url), rank=0, world_size=1))
    ds = TokenDataset(str(url), rank=0, world_size=1, skip_bad_shards=True)
    got = [s["key"] for s in ds]
    assert len(got) == len(keys) - 15 and ds.skipped_shards == ["shards/shard-000002.parquet"]
    (url / "shards" / "shard-000004.parquet").unlink()
    with pytest.raises(ShardError, match="shard-000004"):
        list(TokenDataset(str(url), rank=0, world_size=1, skip_bad_shards=False))


def test_streams_from_s3_with_local_cache(tmp_path, s3_bucket):
    import s3fs

    keys = make_dataset(tmp_path / "ds")
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(tmp_path / "ds"), f"{bucket}/tokens", recursive=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    ds = TokenDataset(f"s3://{bucket}/tokens", rank=0, world_size=1, storage_options=opts,
                      cache_dir=str(cache), cache_bytes=3000)
    got = [k for b in TokenLoader(ds, batch_size=5, num_workers=2) for k in b["key"]]
    assert Counter(got) == Counter(keys)
    assert sum(f.stat().st_size for f in cache.iterdir()) <= 2 * 3000 + 4000  # budget (plus the shard in use)
