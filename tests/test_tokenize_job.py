"""The Ray tokenization job end to end, against real parts: embedded Ray, moto S3, pyarrow,
polars and webdataset reading the output back, and killed workers and drivers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from jobs.tokenize import TokenizeConfig, run
from pipelines.producer.images import decode_image, make_variants
from pipelines.contract.manifest import IncompatibleOutput
from pipelines.contract.storage import is_temporary
from pipelines.ray_runtime import ray_session
from tests.pipeline_data import bomb_bytes, jpeg_bytes, png_bytes, write_folder, write_tar
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import to_tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with ray_session(num_cpus=2) as ray:
        yield ray


def _job(inp, out, **kw) -> dict:
    return run(TokenizeConfig(input=str(inp), output=str(out), **kw))


def _manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def _parquet_rows(out) -> pl.DataFrame:
    m = _manifest(out)
    return pl.concat([pl.read_parquet(Path(out) / s["path"]) for s in m["shards"] if s["path"]])


def test_folder_to_parquet(tmp_path):
    keys = write_folder(tmp_path / "in", classes=2, per_class=3)
    out = tmp_path / "out"
    summary = _job(tmp_path / "in", out, variants="center,flip", rows_per_shard=4, batch_size=3)
    assert summary["complete"] and summary["images"] == 6 and summary["shards"] == 2

    m = _manifest(out)
    assert m["variants"] == ["center", "flip"] and m["codebook_size"] == 1024 and m["tokens_per_image"] == 256
    assert m["fingerprint"] == VFMTokenizer.from_config("tiny", seed=0).fingerprint
    for shard in m["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        table = pq.read_table(out / shard["path"])
        assert str(table.schema.field("tokens").type) == "fixed_size_list<element: uint16>[512]"
        assert str(table.schema.field("label").type) == "int32"

    rows = _parquet_rows(out)
    # In plan order: the two class folders interleaved.
    assert rows["key"].to_list() == [keys[i] for i in (0, 3, 1, 4, 2, 5)] and rows["label"].to_list() == [0, 1] * 3
    # Tokens equal VFMTokenizer.encode on the same crops, variant-major within a row.
    tok = VFMTokenizer.from_config("tiny", seed=0)
    for key, tokens in zip(rows["key"], rows["tokens"]):
        raw = (tmp_path / "in" / f"{key}.png").read_bytes()
        crops = make_variants(decode_image(raw), 112, ("center", "flip"))
        expected = tok.encode(to_tensor(crops)).numpy().reshape(-1)
        np.testing.assert_array_equal(np.asarray(tokens), expected)
        assert rows.filter(pl.col("key") == key)["sha256"][0] == hashlib.sha256(raw).digest()

    again = _job(tmp_path / "in", out, variants="center,flip", rows_per_shard=4)
    assert again["this_run"]["images"] == 0 and _manifest(out) == m


def test_other_tokenizer_or_variants_are_refused_unless_overwrite(tmp_path):
    write_folder(tmp_path / "in", classes=1, per_class=2)
    out = tmp_path / "out"
    _job(tmp_path / "in", out)
    with pytest.raises(IncompatibleOutput, match="fingerprint"):
        _job(tmp_path / "in", out, seed=1)
    with pytest.raises(IncompatibleOutput, match="variants"):
        _job(tmp_path / "in", out, variants="flip")
    summary = _job(tmp_path / "in", out, variants="flip", overwrite=True)
    assert summary["images"] == 2 and _manifest(out)["variants"] == ["flip"]
    # Written with these settings: --overwrite resumes it (a restarted script keeps its work).
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = _job(tmp_path / "in", out, variants="flip", overwrite=True)
    assert again["this_run"]["images"] == 0 and again["images"] == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == shards


def test_webdataset_output_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    write_tar(tmp_path / "in" / "a.tar", [(f"s{i}", {"jpg": jpeg_bytes(i), "cls": str(i).encode()}) for i in range(4)])
    out = tmp_path / "out"
    _job(tmp_path / "in", out, format="webdataset", variants="center,flip")
    shards = [str(out / s["path"]) for s in _manifest(out)["shards"]]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"a/s{i}" for i in range(4)]
    for i, s in enumerate(samples):
        assert s["tokens.npy"].shape == (2, 256) and s["tokens.npy"].dtype == np.uint16
        assert s["cls"] == i and s["json"]["key"] == f"a/s{i}" and s["json"]["variants"] == ["center", "flip"]


def test_bad_inputs_are_rejected_and_good_ones_tokenized_once(tmp_path):
    good = {f"good{i}": {"jpg": jpeg_bytes(i)} for i in range(3)}
    cmyk = io.BytesIO()
    from PIL import Image

    Image.new("CMYK", (50, 40), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    bad = [
        ("truncated", {"jpg": jpeg_bytes(9)[:200]}),
        ("empty", {"png": b""}),
        ("text", {"png": b"definitely not an image"}),
        ("bomb", {"png": bomb_bytes()}),
        ("good0", {"jpg": jpeg_bytes(100)}),  # duplicate key: the first occurrence wins
    ]
    write_tar(tmp_path / "in" / "mix.tar", [*good.items(), ("cmyk", {"jpg": cmyk.getvalue()}), *bad])
    out = tmp_path / "out"
    summary = _job(tmp_path / "in", out)
    assert summary["images"] == 4
    assert summary["rejects_by_reason"] == {"corrupt": 1, "duplicate_key": 1, "empty": 1, "not_an_image": 1, "too_large": 1}
    rows = _parquet_rows(out)
    assert sorted(rows["key"].to_list()) == ["mix/cmyk", "mix/good0", "mix/good1", "mix/good2"]
    good0 = rows.filter(pl.col("key") == "mix/good0")["sha256"][0]
    assert good0 == hashlib.sha256(jpeg_bytes(0)).digest()
    m = _manifest(out)
    rejects = pl.read_parquet(out / m["shards"][0]["rejects_path"])
    assert dict(zip(rejects["key"], rejects["reason"])) == {
        "mix/truncated": "corrupt", "mix/empty": "empty", "mix/text": "not_an_image",
        "mix/bomb": "too_large", "mix/good0": "duplicate_key",
    }
    assert all(rejects["error"].str.len_chars() > 0)


def test_s3_input_and_output(tmp_path, s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    for t in range(2):
        write_tar(tmp_path / f"t{t}.tar", [(f"k{i}", {"jpg": jpeg_bytes(10 * t + i), "cls": b"3"}) for i in range(3)])
        fs.put(str(tmp_path / f"t{t}.tar"), f"{bucket}/in/t{t}.tar")
    out = f"s3://{bucket}/tokens"
    summary = _job(f"s3://{bucket}/in", out, storage_options=json.dumps(opts))
    assert summary["images"] == 6 and summary["complete"]
    manifest = json.loads(fs.cat_file(f"{bucket}/tokens/manifest.json"))
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/tokens/{manifest['shards'][1]['path']}")))
    assert table.column("key").to_pylist() == ["t1/k0", "t1/k1", "t1/k2"]
    assert set(table.column("label").to_pylist()) == {3}
    # Local run of the same data gives the same shard bytes.
    for t in range(2):
        (tmp_path / "local" ).mkdir(exist_ok=True)
        (tmp_path / "local" / f"t{t}.tar").write_bytes((tmp_path / f"t{t}.tar").read_bytes())
    _job(tmp_path / "local", tmp_path / "lout")
    assert [s["sha256"] for s in _manifest(tmp_path / "lout")["shards"]] == [s["sha256"] for s in manifest["shards"]]


def _many_tars(root: Path, n_tars: int = 16, per_tar: int = 3) -> None:
    for t in range(n_tars):
        write_tar(root / f"p{t:03d}.tar", [(f"k{i}", {"png": png_bytes(t * 100 + i)}) for i in range(per_tar)])


def test_worker_killed_mid_job_still_exactly_once(tmp_path, ray_cluster):
    _many_tars(tmp_path / "in", n_tars=24, per_tar=40)  # long enough for the kill to land mid-job
    reference = tmp_path / "ref"
    _job(tmp_path / "in", reference)

    out = tmp_path / "out"
    result: dict = {}
    # One item in flight: the actor's queue stays short, so asking its pid does not wait for the job.
    job = threading.Thread(target=lambda: result.update(_job(tmp_path / "in", out, max_bytes_in_flight=1)))
    job.start()
    commits = out / "_state" / "commits"
    deadline = time.time() + 60
    while time.time() < deadline and not (commits.exists() and any(commits.iterdir())):
        time.sleep(0.01)
    actor = ray_cluster.get_actor("vfmtok-tokenizer-0")
    pid = ray_cluster.get(actor.info.remote())["pid"]
    assert job.is_alive() and len(list(commits.iterdir())) < 24, "the job should still be running"
    os.kill(pid, signal.SIGKILL)
    job.join(timeout=120)
    # The only tokenizer process died mid-job; that the job still finished means Ray restarted it
    # and retried its calls.
    assert result["complete"] and result["images"] == 960
    rows = _parquet_rows(out)
    assert rows["key"].n_unique() == rows.height == 960
    assert _manifest(out)["shards"] == _manifest(reference)["shards"]


def _committed(commits: Path) -> list[Path]:
    return [p for p in commits.iterdir() if not is_temporary(str(p))] if commits.exists() else []


# The default suite kills the driver in tests/test_chaos.py (twice, locally, among actor kills) and
# in tests/test_s3_resilience.py (at three points, on S3); this one, in `make test-all`, also checks
# the rerun's count of the items it skipped.
@pytest.mark.slow
def test_driver_killed_and_rerun_gives_the_uninterrupted_output(tmp_path):
    _many_tars(tmp_path / "in", n_tars=30)
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", str(tmp_path / "in"), "--variants", "center,flip"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([*cmd, "--output", str(tmp_path / "ref")], cwd=ROOT, env=env, check=True, capture_output=True)

    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = out / "_state" / "commits"
    deadline = time.time() + 90
    while time.time() < deadline and len(_committed(commits)) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_committed(commits))  # not a record the kill left half-written
    assert 0 < done_before < 30, "the driver should die mid-job"
    assert _manifest(out)["complete"] is False  # written at the start; complete only at the end

    rerun = subprocess.run([*cmd, "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # Tasks already running when the driver died may still commit (same bytes, same names).
    resumed = int(re.search(r"(\d+) of 30 work items already committed", rerun.stderr).group(1))
    assert done_before <= resumed < 30
    assert _manifest(out)["shards"] == _manifest(tmp_path / "ref")["shards"]
    rows = _parquet_rows(out)
    assert rows["key"].n_unique() == rows.height == 90


def test_dry_run_plans_reports_and_writes_nothing(tmp_path):
    write_folder(tmp_path / "in", classes=3, per_class=3)
    size = sum(p.stat().st_size for p in (tmp_path / "in").rglob("*.png"))
    out = tmp_path / "out"
    report = _job(tmp_path / "in", out, rows_per_shard=4, dry_run=True)
    assert not out.exists()
    assert report == {
        "input": str(tmp_path / "in"), "input_format": "folder", "output": str(out), "plan": "new",
        "settings_that_differ_from_the_stored_plan": [], "inputs": 9, "input_bytes": size, "work_items": 3,
        "classes": 3, "committed_items": 0, "to_do": {"work_items": 3, "input_bytes": size},
    }
    _job(tmp_path / "in", out, rows_per_shard=4)
    again = _job(tmp_path / "in", out, rows_per_shard=4, variants="center,flip", dry_run=True)
    assert again["plan"] == "stored by an earlier run" and again["committed_items"] == 3
    assert again["to_do"] == {"work_items": 0, "input_bytes": 0}
    assert again["settings_that_differ_from_the_stored_plan"] == ["variants"]
    assert _manifest(out)["classes"] == ["class0", "class1", "class2"]


def test_named_parquet_columns(tmp_path, capsys):
    import pyarrow as pa

    from jobs.tokenize import main

    (tmp_path / "in").mkdir()
    table = pa.table({"pixels": [png_bytes(i) for i in range(3)], "y": [7, 8, 9], "name": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "in" / "part.parquet")
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o1")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no image column" in err[-1] and "--image-column" in err[-1] and "Traceback" not in "\n".join(err)
    with pytest.raises(SystemExit, match="2"):
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o2"), "--image-column", "pixels",
              "--label-column", "nope"])
    assert "no column 'nope' (--label-column)" in capsys.readouterr().err
    summary = _job(tmp_path / "in", tmp_path / "o3", image_column="pixels", label_column="y", key_column="name")
    assert summary["images"] == 3
    rows = _parquet_rows(tmp_path / "o3")
    assert rows["key"].to_list() == ["part/a", "part/b", "part/c"] and rows["label"].to_list() == [7, 8, 9]
    assert _manifest(tmp_path / "o3")["columns"] == {"image": "pixels", "key": "name", "label": "y"}


def test_an_error_that_would_repeat_stops_the_job_with_one_line(tmp_path, capsys, caplog):
    import pyarrow as pa

    from jobs.tokenize import main

    (tmp_path / "in").mkdir()
    table = pa.table({"image": [png_bytes(i, size=(200, 200)) for i in range(6)]})
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=3, compression="zstd")
    raw = bytearray((tmp_path / "in" / "a.parquet").read_bytes())
    raw[4:200] = bytes(196)  # the first page header of the first row group; the footer is intact
    (tmp_path / "in" / "a.parquet").write_bytes(bytes(raw))
    start = time.time()
    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and time.time() - start < 30
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "shard-000000" in err.strip().splitlines()[-1] and "would repeat" in err.strip().splitlines()[-1]
    assert "RANDOM WEIGHTS" in caplog.text  # no --tokenizer: said loudly
    assert _manifest(tmp_path / "out")["complete"] is False  # nothing was committed


def test_tencrop_cut_on_the_tokenizer_equals_encoding_the_crops(tmp_path):
    """Only source crops cross the object store; variants are cut where they are encoded. The tokens
    must equal encoding the CPU-cut crops, whatever the batch size, sharding and bytes in flight."""
    write_folder(tmp_path / "in", classes=1, per_class=3)
    _job(tmp_path / "in", tmp_path / "a", variants="center,tencrop", batch_size=5)
    _job(tmp_path / "in", tmp_path / "b", variants="center,tencrop", batch_size=64, rows_per_shard=1,
         max_bytes_in_flight=1)  # one item at a time
    _job(tmp_path / "in", tmp_path / "c", variants="center,tencrop", batch_size=64)
    _job(tmp_path / "in", tmp_path / "d", variants="center,tencrop", batch_size=64, chunk_bytes=1)  # a chunk per image
    assert _manifest(tmp_path / "a")["shards"] == _manifest(tmp_path / "c")["shards"] == _manifest(tmp_path / "d")["shards"]
    assert _parquet_rows(tmp_path / "b").equals(_parquet_rows(tmp_path / "a"))
    tok = VFMTokenizer.from_config("tiny", seed=0)
    names = tuple(_manifest(tmp_path / "a")["variants"])
    assert len(names) == 11
    for key, tokens in zip(*_parquet_rows(tmp_path / "a").select("key", "tokens").get_columns()):
        crops = make_variants(decode_image((tmp_path / "in" / f"{key}.png").read_bytes()), 112, names)
        np.testing.assert_array_equal(np.asarray(tokens), tok.encode(to_tensor(crops)).numpy().reshape(-1))


def test_extend_adds_new_inputs_after_the_committed_ones(tmp_path):
    write_folder(tmp_path / "in", classes=2, per_class=3)
    out = tmp_path / "out"
    _job(tmp_path / "in", out, rows_per_shard=4)
    before = _manifest(out)
    (tmp_path / "in" / "class2").mkdir()
    for i in range(2):
        (tmp_path / "in" / "class2" / f"new{i}.png").write_bytes(png_bytes(500 + i))
    (tmp_path / "in" / "class0" / "img0.png").unlink()
    # A plain rerun resumes the stored plan: the new files are not picked up silently.
    assert _job(tmp_path / "in", out, rows_per_shard=4)["this_run"]["images"] == 0
    summary = _job(tmp_path / "in", out, rows_per_shard=4, extend=True)
    assert summary["extend"]["new_inputs"] == 2 and summary["extend"]["new_classes"] == ["class2"]
    assert summary["extend"]["vanished_examples"] == ["class0/img0.png"]
    assert summary["this_run"]["images"] == 2 and summary["complete"]
    after = _manifest(out)
    assert after["shards"][: len(before["shards"])] == before["shards"]  # committed shards untouched
    assert [s["shard"] for s in after["shards"]] == ["shard-000000", "shard-000001", "shard-000002"]
    assert after["classes"] == ["class0", "class1", "class2"]
    rows = _parquet_rows(out)
    assert rows["key"].to_list()[-2:] == ["class2/new0", "class2/new1"] and rows["label"].to_list()[-2:] == [2, 2]


def test_a_tar_sent_in_chunks_gives_the_same_shard_and_rejects(tmp_path):
    """A work item is decoded and encoded in bounded chunks: the shard and the rejects (in order)
    must not depend on where the chunks end."""
    samples = [(f"k{i:02d}", {"png": png_bytes(i)} if i % 4 else {"png": b"not an image"}) for i in range(10)]
    write_tar(tmp_path / "in" / "part.tar", samples)
    whole = _job(tmp_path / "in", tmp_path / "whole", variants="center,flip")
    chunked = _job(tmp_path / "in", tmp_path / "chunked", variants="center,flip", chunk_bytes=2 * 112 * 112 * 3)
    assert whole["images"] == chunked["images"] == 7 and chunked["rejects_by_reason"] == {"not_an_image": 3}
    assert _manifest(tmp_path / "whole")["shards"] == _manifest(tmp_path / "chunked")["shards"]
    rejects = pq.read_table(tmp_path / "chunked" / "rejects" / "shard-000000.parquet").column("key").to_pylist()
    assert rejects == ["part/k00", "part/k04", "part/k08"]


def test_tokenizer_actors_wait_passively_unless_the_driver_says_otherwise(ray_cluster, monkeypatch):
    """CPU tokenizer threads share cores with the decode tasks; spinning OpenMP threads would take
    CPU from them. The wait policy reaches the actor's process before torch loads."""
    from pipelines.producer.ray_tokenize import start_workers
    from pipelines.producer.worker import TokenizerSpec

    def actor_environment() -> dict:
        (actor,) = start_workers(TokenizerSpec("tiny"), 1, 0, 1, 8)
        pid = ray_cluster.get(actor.info.remote())["pid"]
        env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        ray_cluster.kill(actor)
        deadline = time.time() + 30  # the name is free once Ray has seen the actor die
        while time.time() < deadline:
            try:
                ray_cluster.get_actor("vfmtok-tokenizer-0")
            except ValueError:
                break
            time.sleep(0.05)
        return env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert actor_environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert actor_environment()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_missing_or_unusable_tokenizer_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    """Missing: found before Ray starts. Unusable (here: no backbone and no --dinov2): every actor
    restart would fail the same way, so the job stops with the actor's reason, not Ray's traceback."""
    import torch

    from jobs.tokenize import main

    write_folder(tmp_path / "in", classes=1, per_class=2)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--config", "tiny"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--tokenizer", str(tmp_path / "missing.pt")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --tokenizer {tmp_path / 'missing.pt'} does not exist"]

    torch.save({"model": {"decoder.w": torch.zeros(2)}}, tmp_path / "decoder-only.pt")
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--tokenizer", str(tmp_path / "decoder-only.pt")])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the tokenizer could not be built: ") and "holds no DINOv2 backbone weights" in last
    assert not (tmp_path / "out" / "shards").exists()
