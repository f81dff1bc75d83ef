"""The streaming dataset: exactly once per epoch for any world size and worker count, exact
mid-epoch resume (also across world sizes), variants, refusals, corrupt shards, S3."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.contract.manifest import COMMITS
from pipelines.consumer.streaming import DatasetIncomplete, DatasetMismatch, ShardError, TokenDataset, TokenLoader
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
    # The node cache already holds the verified shard 4: a fresh one sees the deletion.
    fresh = dict(rank=0, world_size=1, cache_dir=str(url.parent / "fresh"))
    with pytest.raises(ShardError, match="shard-00000[24]"):
        list(TokenDataset(str(url), skip_bad_shards=False, **fresh))
    ds = TokenDataset(str(url), skip_bad_shards=True, **fresh)
    got = [s["key"] for s in ds]
    assert sorted(ds.skipped_shards) == ["shards/shard-000002.parquet", "shards/shard-000004.parquet"]
    assert len(got) == len(keys) - 15 - 14


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


# ---------------------------------------------------------------------------- order and resume
def _global_sequence(url, world, global_batch, steps, workers, state=None, order="global"):
    """The epoch's global sample sequence as ``world`` ranks consume it, ``steps`` steps from
    ``state``: position ``consumed + r + W*j`` holds rank r's j-th sample. Returns (keys, state)."""
    per_rank = global_batch // world
    datasets, iters = [], []
    for rank in range(world):
        ds = TokenDataset(str(url), seed=4, rank=rank, world_size=world, order=order, window_shards=2)
        if state:
            ds.load_state_dict(json.loads(json.dumps(state)))
        datasets.append(ds)
        iters.append(iter(TokenLoader(ds, batch_size=per_rank, num_workers=workers)))
    seq = [None] * (steps * global_batch)
    for step in range(steps):
        for rank, it in enumerate(iters):
            for i, key in enumerate(next(it)["key"]):
                seq[rank + world * (step * per_rank + i)] = key
    return seq, datasets[0].state_dict()


@pytest.mark.parametrize("order", ["global", "window"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_2_to_3_ranks_continues_the_uninterrupted_sequence_step_by_step(dataset, order, workers):
    url, keys = dataset
    names = np.array(keys)
    reference = TokenDataset(str(url), seed=4, rank=0, world_size=1, order=order, window_shards=2)
    expected = names[reference.epoch_order()].tolist()
    first, state = _global_sequence(url, 2, 6, 4, workers, order=order)
    assert first == expected[:24]  # the same sequence, step by step, not only the same samples
    assert state["consumed"] == 24 and state["order"] == order
    rest, _ = _global_sequence(url, 3, 6, (len(keys) - 24) // 6, workers, state=state, order=order)
    assert rest == expected[24 : 24 + len(rest)]


def test_global_order_mixes_a_class_sorted_dataset_from_the_first_steps(tmp_path):
    from pipelines.contract.manifest import write_dataset
    from pipelines.contract.shards import ShardRows

    shards = []
    for c in range(40):  # one class per shard, as a folder of class folders becomes
        k = [f"c{c}-{i}" for i in range(25)]
        shards.append(ShardRows(k, [c] * 25, ["s"] * 25, [bytes(32)] * 25, np.zeros((25, 1, 256), np.uint16)))
    write_dataset(str(tmp_path / "ds"), shards, {"fingerprint": "f", "variants": ["center"], "format": "parquet",
                                                 "tokens_per_image": 256}, 1024)
    seen = {}
    for order in ("global", "window"):
        ds = TokenDataset(str(tmp_path / "ds"), rank=0, world_size=1, order=order, window_shards=2)
        first = [s["label"] for _, s in zip(range(100), ds)]  # the first 10% of the epoch
        seen[order] = len(set(first))
    # A full random permutation sees 36.8 of the 40 classes on average (40 * (1 - (39/40)**100)).
    assert seen["window"] <= 4 and seen["global"] >= 32


def test_incomplete_dataset_is_refused_unless_followed(dataset):
    url, keys = dataset
    manifest = json.loads((url / "manifest.json").read_text())
    committed = manifest["shards"][:3]
    (url / "manifest.json").write_text(json.dumps({**manifest, "shards": committed, "complete": False}))
    with pytest.raises(DatasetIncomplete, match="--follow"):
        TokenDataset(str(url), rank=0, world_size=1)
    ds = TokenDataset(str(url), rank=0, world_size=1, follow=True)
    # The epoch is the shards committed when it began: here all seven have commit records.
    assert sorted(s["key"] for s in ds) == sorted(keys)


def _follow_in_thread(url, **kw) -> dict:
    """TokenDataset(follow=True) in a thread that the test waits on for at most a minute (a
    follower that never gives up must fail the test, not hang it)."""
    import threading

    outcome: dict = {}

    def follow():
        try:
            outcome["ds"] = TokenDataset(str(url), rank=0, world_size=1, follow=True, poll_seconds=0.05, **kw)
        except DatasetIncomplete as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the follower is still waiting"
    return outcome


def test_follow_gives_up_on_a_job_that_stopped_committing(dataset):
    url, _ = dataset
    manifest = json.loads((url / "manifest.json").read_text())
    (url / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    outcome = _follow_in_thread(url, min_samples=10**6, follow_patience_seconds=0.5)
    assert "no work item was committed" in outcome["error"] and "--follow-patience" in outcome["error"]


def test_a_follower_never_reads_a_commit_record_still_being_written(dataset):
    """A local committer writes ``.tmp-<id>-shard-N.json`` and renames it; a follower's listing
    can catch it in between, with part of the record written or with the file already renamed."""
    url, keys = dataset
    manifest = json.loads((url / "manifest.json").read_text())
    (url / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (url / COMMITS / ".tmp-0f1e2d3c-shard-000099.json").write_text('{"shard": "shard-0000')
    ds = TokenDataset(str(url), rank=0, world_size=1, follow=True)
    assert sorted(s["key"] for s in ds) == sorted(keys)


def test_follow_waits_on_as_long_as_commits_keep_coming(dataset):
    """Patience counts from the last new commit, not from the start: records arriving every 0.2 s
    for longer than the patience (0.5 s) in all keep the follower waiting until it has enough."""
    import shutil
    import threading
    import time

    url, keys = dataset
    manifest = json.loads((url / "manifest.json").read_text())
    (url / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    held, commits = url.parent / "held", url / COMMITS
    shutil.move(commits, held)
    records = sorted(held.iterdir())
    commits.mkdir()

    def commit_slowly():
        for record in records:
            time.sleep(0.2)
            shutil.copy(record, commits / record.name)

    writer = threading.Thread(target=commit_slowly, daemon=True)
    writer.start()
    outcome = _follow_in_thread(url, min_samples=len(keys), follow_patience_seconds=0.5)
    writer.join()
    assert "error" not in outcome and sorted(s["key"] for s in outcome["ds"]) == sorted(keys)


# ---------------------------------------------------------------------------- the node cache
def test_one_fetch_per_node_shared_by_ranks_and_workers_then_cleaned_up(tmp_path, s3_bucket, proxy):
    import s3fs

    keys = make_dataset(tmp_path / "ds", shards=12, rows=10)
    bucket, opts = s3_bucket
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).put(str(tmp_path / "ds"), f"{bucket}/tokens", recursive=True)
    shard_bytes = sum(f.stat().st_size for f in (tmp_path / "ds" / "shards").iterdir())
    via = {**opts, "client_kwargs": {**opts.get("client_kwargs", {}), "endpoint_url": proxy.endpoint}}
    root = tmp_path / "cache"
    proxy.reset_counts()
    got, datasets = [], []
    for rank in range(4):  # ranks 0-1 on node a, 2-3 on node b; two loader workers each
        ds = TokenDataset(f"s3://{bucket}/tokens", storage_options=via, rank=rank, world_size=4,
                          cache_dir=str(root), node="ab"[rank // 2])
        datasets.append(ds)
        got += [k for b in TokenLoader(ds, batch_size=4, num_workers=2) for k in b["key"]]
    assert Counter(got) == Counter(keys)
    manifests = 4 * (tmp_path / "ds" / "manifest.json").stat().st_size
    assert proxy.counts["bytes_out"] - manifests <= 2 * shard_bytes  # each shard once per node
    assert {p.name for p in root.iterdir()} == {datasets[0].cache.dir.split("/")[-2]}
    for ds in datasets:
        ds.close()
    assert list(root.iterdir()) == []  # the last process to leave removed the cache


def test_window_order_keeps_the_node_cache_within_its_budget(dataset, tmp_path):
    url, keys = dataset
    ds = TokenDataset(str(url), rank=0, world_size=1, cache_dir=str(tmp_path / "c"), cache_bytes=30_000,
                      window_shards=1)
    assert ds.mode == "window"  # the set does not fit 30 kB: shard windows, not a global order
    peak = 0
    got = []
    for s in ds:
        got.append(s["key"])
        peak = max(peak, ds.cache.held_bytes())
    assert sorted(got) == sorted(keys)
    # The budget, plus the shard read ahead and the one being filled (each lands before the evictions).
    assert 0 < peak <= 30_000 + 2 * 15 * (1024 + 64)


def test_webdataset_token_shards_stream_like_parquet(tmp_path):
    keys = make_dataset(tmp_path / "pq")
    make_dataset(tmp_path / "wds", fmt="webdataset")
    a = [s["key"] for s in TokenDataset(str(tmp_path / "pq"), rank=0, world_size=1)]
    b = [(s["key"], s["tokens"].tolist(), s["label"]) for s in TokenDataset(str(tmp_path / "wds"), rank=0, world_size=1)]
    c = [(s["key"], s["tokens"].tolist(), s["label"]) for s in TokenDataset(str(tmp_path / "pq"), rank=0, world_size=1)]
    assert sorted(a) == sorted(keys) and sorted(b) == sorted(c)


# ---------------------------------------------------------------------------- follow mode
def _shard_keys(out, shards) -> list[str]:
    import pyarrow.parquet as pq

    return [k for s in shards for k in pq.read_table(out / s["path"], columns=["key"]).column("key").to_pylist()]


def test_follow_trains_on_a_job_still_writing_exactly_once_per_epoch_and_resumes(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.pipeline_data import write_folder

    every = sorted(write_folder(tmp_path / "in", classes=4, per_class=30))
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.tokenize", "--input", str(tmp_path / "in"), "--output", str(out),
         "--rows-per-shard", "2", "--max-bytes-in-flight", "1"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "manifest.json").exists():
            time.sleep(0.05)
        ds = TokenDataset(str(out), rank=0, world_size=1, follow=True, min_samples=4, poll_seconds=0.1)
        first = [s["shard"] for s in ds.shards]
        assert 2 <= len(first) < 60, "the trainer should start while the job is still writing"
        names = np.array(_shard_keys(out, ds.shards))
        # Epoch 0: exactly the samples of the shards committed when it began, in the epoch's order.
        assert [s["key"] for s in ds] == names[ds.epoch_order()].tolist()

        ds.set_epoch(1)  # takes what was committed since
        assert [s["shard"] for s in ds.shards][: len(first)] == first and len(ds.shards) >= len(first)
        expected = np.array(_shard_keys(out, ds.shards))[ds.epoch_order()].tolist()
        it = iter(ds)
        head = [next(it)["key"] for _ in range(3)]
        state = ds.state_dict()
        resumed = TokenDataset(str(out), rank=0, world_size=1, follow=True, poll_seconds=0.1)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # the job may have committed more since
        assert head + [s["key"] for s in resumed] == expected
    finally:
        assert job.wait(timeout=300) == 0
    ds.set_epoch(2)  # the job has finished: the whole dataset
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert sorted(s["key"] for s in ds) == every


def test_a_forked_loader_worker_never_closes_the_parents_s3_sessions(s3_bucket):
    """Closing them in the child ran on the wrong event loop (tracebacks at each worker's exit)
    and could end connections the parent still uses."""
    import os
    import weakref

    from pipelines.contract.storage import filesystem

    bucket, opts = s3_bucket
    fs, _ = filesystem(f"s3://{bucket}/x", {**opts, "skip_instance_cache": True})
    fs.ls(bucket)  # opens the session, whose finaliser closes it

    def sessions() -> int:
        return sum(getattr(i.func, "__qualname__", "") == "S3FileSystem.close_session" for i in weakref.finalize._registry.values())

    assert sessions() >= 1
    pid = os.fork()
    if pid == 0:
        os._exit(0 if sessions() == 0 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert sessions() >= 1  # the parent's own stay


def test_a_shard_evicted_between_its_fill_and_its_mapping_is_fetched_again(dataset, tmp_path, monkeypatch):
    """Under budget pressure another process's fill may evict a shard this one just filled."""
    import os
    import threading

    from pipelines.consumer import node_cache

    url, keys = dataset
    real, evicted = np.load, []

    def racing(path, *args, **kwargs):
        if not evicted and threading.current_thread() is threading.main_thread():  # the reader, not a read-ahead
            evicted.append(path)
            os.remove(path)  # as another fill's eviction would, before this process maps it
        return real(path, *args, **kwargs)

    monkeypatch.setattr(node_cache.np, "load", racing)
    ds = TokenDataset(str(url), rank=0, world_size=1, cache_dir=str(tmp_path / "c"))
    assert sorted(s["key"] for s in ds) == sorted(keys) and len(evicted) == 1


def test_opening_a_dataset_sweeps_the_folders_killed_runs_left_on_this_node(dataset, tmp_path):
    """A run killed (SIGKILL, OOM) leaves its node folder; the next dataset opened on the node
    removes it, but never a folder another process still reads, nor another node's."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.pipeline_data import make_token_dataset

    url, keys = dataset
    other = tmp_path / "other"
    make_token_dataset(other, shards=2, rows=4)
    root = tmp_path / "c"
    script = ("import sys, time; from pipelines.consumer.streaming import TokenDataset; "
              "ds = TokenDataset(sys.argv[1], rank=0, world_size=1, cache_dir=sys.argv[2], node='n0'); "
              "[s for s in ds]; print('ready', flush=True); time.sleep(600)")
    killed = subprocess.Popen([sys.executable, "-c", script, str(other), str(root)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1])
    assert killed.stdout.readline().strip() == b"ready"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [stale] = list(root.iterdir())
    assert any(p.suffix == ".npy" for p in (stale / "node-n0").iterdir())  # the shards it fetched are left

    in_use = root / "vfmtok-0123456789abcdef" / "node-n0"
    elsewhere = root / "vfmtok-fedcba9876543210" / "node-n1"
    for folder in (in_use, elsewhere):
        folder.mkdir(parents=True)
        (folder / "x.npy").write_bytes(b"x")
    reader = os.open(in_use / "users.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a process of another run, reading its folder
    try:
        ds = TokenDataset(str(url), rank=0, world_size=1, cache_dir=str(root), node="n0")
        assert not stale.exists()
        assert (in_use / "x.npy").exists() and (elsewhere / "x.npy").exists()
        assert sorted(s["key"] for s in ds) == sorted(keys)
        ds.close()
    finally:
        os.close(reader)
    assert sorted(p.name for p in root.iterdir()) == [in_use.parent.name, elsewhere.parent.name]


def test_sweeps_racing_each_other_never_fail_and_leave_nothing(tmp_path):
    """Ranks of a node open their datasets at once, so sweeps run side by side (as close() does on
    a folder a sweep is looking at): a folder removed under a sweep is skipped, never an error."""
    import threading

    from pipelines.consumer.node_cache import _sweep

    root = tmp_path / "c"
    for d in range(30):
        folder = root / f"vfmtok-{d:016x}" / "node-n0"
        folder.mkdir(parents=True)
        (folder / "users.lock").touch()
        for f in range(40):
            (folder / f"shard-{f:06d}.npy").write_bytes(b"x" * 100)
    errors = []

    def sweep():
        try:
            _sweep(str(root), "node-n0", keep="")
        except Exception as e:  # noqa: BLE001 - the test is that there are none
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(root.iterdir()) == []
