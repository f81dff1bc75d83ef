"""The tokenization job and the trainer on S3 when things go wrong: the driver killed at random
points and rerun, listings that must be fresh, and a store that throttles, resets and truncates
(through the fault-injecting proxy in infra/). Real parts throughout: moto's S3 server on
127.0.0.1, embedded Ray, s3fs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import s3fs

from infra.s3_fault_proxy import FaultRates
from jobs.tokenize import TokenizeConfig, run
from pipelines.ray_runtime import ray_session
from pipelines.contract.storage import exists, filesystem, find, read_json, write_json
from tests.pipeline_data import make_token_dataset, png_bytes

ROOT = Path(__file__).resolve().parents[1]
IMAGES, ROWS_PER_SHARD = 120, 8
ITEMS = IMAGES // ROWS_PER_SHARD


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with ray_session(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def source(s3_endpoint, tmp_path_factory):
    """A bucket holding a 120-image class folder, and the reference output of an uninterrupted
    run. Yields (bucket, storage options, the reference manifest's shards)."""
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    bucket = "resilience"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.pipe({f"{bucket}/in/class{i % 3}/img{i:03d}.png": png_bytes(i) for i in range(IMAGES)})
    summary = run(_config(bucket, "ref", opts))
    assert summary["complete"] and summary["images"] == IMAGES and summary["this_run"]["storage"]["retries"] == 0
    return bucket, opts, _manifest(fs, bucket, "ref")["shards"]


def _config(bucket: str, out: str, opts: dict, **kw) -> TokenizeConfig:
    return TokenizeConfig(input=f"s3://{bucket}/in", output=f"s3://{bucket}/{out}", rows_per_shard=ROWS_PER_SHARD,
                          storage_options=json.dumps(opts), **kw)


def _manifest(fs, bucket: str, out: str) -> dict:
    return json.loads(fs.cat_file(f"{bucket}/{out}/manifest.json"))


def _commits(client, bucket: str, out: str) -> int:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{out}/_state/commits/")
    return listing.get("KeyCount", 0)


def test_listings_and_reads_after_another_writer_are_fresh(s3_bucket):
    """The reported failure: a filesystem object that listed a folder, then read a file another
    process wrote there later, got FileNotFoundError from its own stale listing."""
    bucket, opts = s3_bucket
    fs, root = filesystem(f"s3://{bucket}/d", opts)
    write_json(fs, f"{root}/a.json", {"n": 1})
    assert find(fs, root) == [f"{root}/a.json"]
    other = s3fs.S3FileSystem(skip_instance_cache=True, **opts)  # another process, in effect
    other.pipe_file(f"{bucket}/d/b.json", b'{"n": 2}')
    assert exists(fs, f"{root}/b.json")
    assert read_json(fs, f"{root}/b.json") == {"n": 2}
    assert find(fs, root) == [f"{root}/a.json", f"{root}/b.json"]


def test_driver_killed_at_random_points_then_rerun(source, s3_endpoint, tmp_path):
    bucket, opts, reference = source
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    options = tmp_path / "s3.json"
    options.write_text(json.dumps(opts))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    points = sorted(random.Random(9).sample(range(1, ITEMS - 2), 3))
    for point in points:
        out = f"killed-at-{point}"
        cmd = [sys.executable, "-m", "jobs.tokenize", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/{out}",
               "--rows-per-shard", str(ROWS_PER_SHARD), "--storage-options", f"@{options}",
               # One item in flight at a time, so that commits land one by one and the kill falls
               # mid-job (the output does not depend on it).
               "--max-bytes-in-flight", "1"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and _commits(client, bucket, out) < point and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = _commits(client, bucket, out)
        assert point <= before < ITEMS, f"the driver should die mid-job (after {before} commits)"
        assert json.loads(fs.cat_file(f"{bucket}/{out}/manifest.json"))["complete"] is False

        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        manifest = _manifest(fs, bucket, out)
        assert manifest["complete"] and manifest["totals"]["images"] == IMAGES
        assert manifest["shards"] == reference  # names, rows, sizes and every sha256
        for shard in manifest["shards"]:
            assert fs.info(f"{bucket}/{out}/{shard['path']}")["size"] == shard["bytes"]


# ---------------------------------------------------------------- a store that misbehaves
FAULTS = FaultRates(slowdown=0.05, reset=0.02, truncate=0.01)


def _via(opts: dict, endpoint: str, **config) -> dict:
    """The same storage options, pointed at ``endpoint`` (the proxy)."""
    out = {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": endpoint}}
    if config:
        out["config_kwargs"] = config
    return out


def test_job_through_a_faulty_store_finishes_exactly_once(source, proxy):
    bucket, opts, reference = source
    proxy.set_rates(FAULTS)
    summary = run(_config(bucket, "faulty", _via(opts, proxy.endpoint)))
    counts, storage = proxy.counts, summary["this_run"]["storage"]
    assert summary["complete"] and not summary["this_run"]["failed_items"] and summary["images"] == IMAGES
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    assert _manifest(fs, bucket, "faulty")["shards"] == reference
    # Every 503 was seen and retried exactly once by our layer (nothing retries it silently);
    # dropped connections are retried here or, once, inside aiohttp, never more than injected.
    by_kind = storage["retries_by_kind"]
    assert counts["slowdown"] >= 5 and by_kind["throttled"] == counts["slowdown"]
    dropped = by_kind.get("connection", 0) + by_kind.get("truncated", 0)
    assert dropped <= counts["reset"] + counts["truncate"]
    assert storage["retries"] == sum(by_kind.values()) and storage["requests"] >= IMAGES


@pytest.mark.parametrize("checks", ["default", "checksums-off"])
def test_commit_record_only_after_the_shard_is_verifiably_stored(s3_bucket, proxy, monkeypatch, checks):
    """A body damaged on the way is caught by the ETag check (with botocore's default request
    checksums and with them off, as S3-compatible stores without CRC support need), retried, and
    after the last attempt the item stays uncommitted."""
    from pipelines.contract.manifest import commit_path, commit_shard
    from pipelines.contract.retry import StorageUnavailable, counting
    from pipelines.contract.shards import ShardRows
    import hashlib
    import numpy as np

    monkeypatch.setenv("VFMTOK_IO_ATTEMPTS", "3")
    monkeypatch.setenv("VFMTOK_IO_BACKOFF_S", "0.01")
    bucket, opts = s3_bucket
    config = {} if checks == "default" else {
        "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    fs, root = filesystem(f"s3://{bucket}/out", _via(opts, proxy.endpoint, **config))
    tokens = np.arange(4 * 256, dtype=np.uint16).reshape(4, 1, 256)
    rows = ShardRows([f"k{i}" for i in range(4)], [0, 1, 2, 3], ["src"] * 4, [bytes(32)] * 4, tokens)

    proxy.set_rates(FaultRates(corrupt=1.0, methods=("PUT",), path_regex="/shards/"))
    with counting() as io, pytest.raises(StorageUnavailable, match="3 attempts"):
        commit_shard(fs, root, "shard-000000", rows, "parquet", ["center"])
    assert io["retries.verify"] == 2
    assert not exists(fs, commit_path(root, "shard-000000"))

    proxy.set_rates(FaultRates())
    record = commit_shard(fs, root, "shard-000000", rows, "parquet", ["center"])
    stored = s3fs.S3FileSystem(skip_instance_cache=True, **opts).cat_file(f"{bucket}/out/{record['path']}")
    assert hashlib.sha256(stored).hexdigest() == record["sha256"] and len(stored) == record["bytes"]
    assert exists(fs, commit_path(root, "shard-000000"))


@pytest.fixture()
def token_set(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    keys = make_token_dataset(tmp_path / "ds", shards=60, rows=3)
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).put(str(tmp_path / "ds"), f"{bucket}/tokens", recursive=True)
    return f"s3://{bucket}/tokens", opts, keys


def test_trainer_epoch_through_a_faulty_store_sees_every_sample_once(token_set, proxy, tmp_path):
    from pipelines.consumer.streaming import TokenDataset

    url, opts, keys = token_set
    proxy.set_rates(FAULTS)
    for rank in range(2):
        common = dict(seed=3, rank=rank, world_size=2, window_shards=4)
        direct = [s["key"] for s in TokenDataset(url, storage_options=opts, cache_dir=str(tmp_path / f"d{rank}"), **common)]
        flaky = [s["key"] for s in TokenDataset(url, storage_options=_via(opts, proxy.endpoint),
                                                cache_dir=str(tmp_path / f"f{rank}"), **common)]
        assert flaky == direct  # the same samples in the same order
        keys = [k for k in keys if k not in set(flaky)]
    assert keys == []  # the two ranks together: every sample, once
    counts = proxy.counts
    assert counts["slowdown"] + counts["reset"] + counts["truncate"] >= 3


def test_training_with_checkpoints_through_a_faulty_store(token_set, proxy, tmp_path):
    from jobs.train_gpt import TrainConfig, train

    url, opts, _ = token_set
    bucket = url.split("/")[2]
    proxy.set_rates(FaultRates(slowdown=0.1, reset=0.05, truncate=0.05))
    common = dict(data=url, global_batch=8, log_every=1, precision="fp32", max_steps=4, ckpt_every=2)
    train(TrainConfig(out=f"s3://{bucket}/direct", storage_options=json.dumps(opts), metrics=str(tmp_path / "a"), **common))
    train(TrainConfig(out=f"s3://{bucket}/flaky", storage_options=json.dumps(_via(opts, proxy.endpoint)),
                      metrics=str(tmp_path / "b"), **common))
    assert (tmp_path / "a").read_text().count("loss") == 4
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n).read_text().splitlines()] for n in "ab"]
    assert losses[0] == losses[1]
    assert sum(proxy.counts[k] for k in ("slowdown", "reset", "truncate")) >= 2


def test_read_ahead_requests_are_bounded_per_process(token_set, proxy, tmp_path, monkeypatch):
    import threading

    from pipelines.contract import retry
    from pipelines.consumer.streaming import TokenDataset

    url, opts, keys = token_set
    monkeypatch.setattr(retry, "SLOTS", threading.BoundedSemaphore(4))
    proxy.set_rates(FaultRates(slow=1.0, slow_seconds=0.2, methods=("GET",), path_regex="/shards/"))
    ds = TokenDataset(url, storage_options=_via(opts, proxy.endpoint), rank=0, world_size=1, window_shards=60,
                      cache_dir=str(tmp_path / "c"))
    assert sorted(s["key"] for s in ds) == sorted(keys)
    assert 3 <= proxy.counts["max_in_flight"] <= 4


def test_remote_folder_is_read_many_requests_at_a_time_in_plan_order(s3_bucket, proxy):
    from pipelines.producer.planning import plan
    from pipelines.producer.sources import read_item

    bucket, opts = s3_bucket
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).pipe(
        {f"{bucket}/imgs/c{i % 2}/img{i:02d}.png": png_bytes(i) for i in range(24)})
    flaky = _via(opts, proxy.endpoint)
    [item] = plan(f"s3://{bucket}/imgs", "folder", 100, flaky)
    proxy.set_rates(FaultRates(slow=1.0, slow_seconds=0.3, methods=("GET",), path_regex="/imgs/c"))
    proxy.reset_counts()
    samples = list(read_item(item, flaky))
    assert [s.key for s in samples] == [f.rsplit(".", 1)[0] for f in item.files]  # plan order kept
    assert [s.data for s in samples] == [png_bytes(int(f[-6:-4])) for f in item.files]
    assert proxy.counts["max_in_flight"] >= 8  # not one GET after another
