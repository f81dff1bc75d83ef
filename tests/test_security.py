"""What we refuse to trust, one test per guard: hostile tar members and folder symlinks, oversized
or malformed metadata, hostile keys and labels, credentials leaking into anything we write, and
servers reachable from the network."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.producer import sources
from pipelines.producer.planning import plan
from pipelines.producer.sources import WorkItem, read_item
from pipelines.contract.storage import TooLarge, filesystem, read_json
from tests.pipeline_data import make_token_dataset, png_bytes, write_folder

ROOT = Path(__file__).resolve().parents[1]


def _samples(item: WorkItem) -> list[tuple[str, str]]:
    return [(s.key, s.error[0] if s.error else "ok") for s in read_item(item)]


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def test_tar_members_with_unsafe_names_or_links_are_refused(tmp_path):
    link = tarfile.TarInfo("evil.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "good.png"
    path = _tar(tmp_path / "in.tar", [
        ("good.png", png_bytes(1)), ("../escape.png", png_bytes(2)), ("/abs/root.png", png_bytes(3)),
        ("a/../../up.png", png_bytes(4)), link, hard, ("big.cls", b"1" * 100), ("big.png", png_bytes(5)),
    ])
    [item] = plan(str(path), "webdataset", 100)
    # A refused member is reported at once; a sample when its group of members ends.
    assert _samples(item) == [
        ("in/../escape", "unsafe_name"),
        ("in//abs/root", "unsafe_name"),
        ("in/a/../../up", "unsafe_name"),
        ("in/evil", "not_a_file"),
        ("in/hard", "not_a_file"),
        ("in/good", "ok"),
        ("in/big", "bad_label"),  # an oversized cls member rejects its sample, unread
    ]


def test_oversized_members_and_files_are_refused_without_reading_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_INPUT_BYTES", 1000)
    small, large = png_bytes(1, size=(8, 8)), png_bytes(2, size=(200, 200))
    assert len(small) < 1000 < len(large)
    [item] = plan(str(_tar(tmp_path / "t.tar", [("s.png", small), ("l.png", large)])), "webdataset", 10)
    assert _samples(item) == [("t/l", "too_large"), ("t/s", "ok")]  # a refusal is reported at once
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "s.png").write_bytes(small)
    (tmp_path / "f" / "l.png").write_bytes(large)
    [item] = plan(str(tmp_path / "f"), "folder", 10)
    assert _samples(item) == [("l", "too_large"), ("s", "ok")]


def test_folder_symlinks_are_never_followed_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(7))
    root = tmp_path / "in"
    write_folder(root, classes=1, per_class=2)
    (root / "class0" / "leak.png").symlink_to(outside / "secret.png")
    (root / "class0" / "alias.png").symlink_to(root / "class0" / "img0.png")  # inside: fine
    (root / "class0" / "dir").symlink_to(outside, target_is_directory=True)
    [item] = plan(str(root), "folder", 100)
    assert "class0/dir/secret.png" not in item.files  # a linked folder is not walked
    assert _samples(item) == [
        ("class0/alias", "ok"), ("class0/img0", "ok"), ("class0/img1", "ok"), ("class0/leak", "outside_root")]
    # A plan edited to climb out is refused the same way at read time.
    tampered = WorkItem("shard-000000", "folder", str(root), 0, 1, ("../outside/secret.png",), (-1,))
    assert _samples(tampered) == [("../outside/secret", "outside_root")]


def test_hostile_keys_and_labels_are_rejected(tmp_path):
    keys = ["fine", "../../etc/cron.d/x", "a/../../b", "new\nline", "k" * 2000, "nul\x00", "ok2", "big-label"]
    labels = [1, 2, 3, 4, 5, 6, 2**31 - 1, 2**40]
    table = pa.table({"image": [png_bytes(i) for i in range(len(keys))], "key": keys, "label": labels})
    pq.write_table(table, tmp_path / "p.parquet")
    [item] = plan(str(tmp_path / "p.parquet"), "parquet", 100)
    got = [(s.error[0] if s.error else "ok") for s in read_item(item)]
    assert got == ["ok", "bad_key", "bad_key", "bad_key", "bad_key", "bad_key", "ok", "bad_label"]
    printed = [s.key for s in read_item(item)]
    assert all(len(k) <= 300 and "\n" not in k and "\x00" not in k for k in printed)


def test_oversized_or_malformed_metadata_is_refused(tmp_path):
    fs, root = filesystem(str(tmp_path))
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 5000}))
    with pytest.raises(TooLarge, match="4096-byte limit"):
        read_json(fs, f"{root}/big.json", limit=4096)
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="deep.json is not valid JSON"):
        read_json(fs, f"{root}/deep.json")
    # A commit record is a few hundred bytes: a huge one is not ours and is refused.
    from pipelines.contract.manifest import load_commits

    make_token_dataset(tmp_path / "ds", shards=2, rows=3)
    (tmp_path / "ds" / "_state" / "commits" / "shard-000001.json").write_text(json.dumps({"pad": "x" * (1 << 20)}))
    with pytest.raises(TooLarge, match="shard-000001.json"):
        load_commits(fs, f"{root}/ds")


def test_latest_pointer_cannot_name_a_file_outside_the_run(tmp_path):
    from pipelines.consumer.checkpoints import load_latest

    from pipelines.consumer.checkpoints import latest_step

    for path in ("../../elsewhere.pt", "../step-00000001", "step-00000001/../../x"):
        (tmp_path / "latest.json").write_text(json.dumps({"step": 1, "path": path}))
        with pytest.raises(ValueError, match="not a checkpoint of this folder"):
            load_latest(str(tmp_path))
        with pytest.raises(ValueError, match="not a checkpoint of this folder"):
            latest_step(str(tmp_path))


# ---------------------------------------------------------------- credentials
SECRET = "vfmtok-S3CR3T-do-not-leak-4f9a"
ACCESS = "AKIAVFMTOKLEAKTEST"


def _secret_opts(endpoint: str) -> dict:
    # moto accepts any credentials, so distinctive ones show up wherever they leak.
    return {"key": ACCESS, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def _assert_clean(blobs: dict[str, bytes]) -> None:
    assert blobs, "nothing was scanned"
    leaks = [name for name, data in blobs.items() if SECRET.encode() in data or ACCESS.encode() in data]
    assert not leaks, f"credentials found in {leaks}"


def _objects(fs, prefix: str) -> dict[str, bytes]:
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def test_tokenize_job_keeps_credentials_out_of_outputs_and_logs(s3_bucket, tmp_path):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.pipe({f"{bucket}/in/img{i}.png": png_bytes(i) for i in range(4)})
    fs.pipe_file(f"{bucket}/in/broken.png", b"not an image")  # a reject record is written too
    secret_opts = _secret_opts(opts["client_kwargs"]["endpoint_url"])
    ray_tmp = tempfile.mkdtemp(prefix="r")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_TMPDIR": ray_tmp}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.tokenize", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out",
             "--storage-options", json.dumps(secret_opts)],
            cwd=ROOT, env=env, capture_output=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs = _objects(fs, f"{bucket}/out")
        assert any(p.endswith("manifest.json") for p in outputs) and any("/rejects/" in p for p in outputs)
        ray_logs = {str(p): p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and "sockets" not in p.parts}
        _assert_clean({**outputs, "stdout": done.stdout, "stderr": done.stderr, **ray_logs})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("layout", ["sharded", "full"])
def test_trainer_keeps_credentials_out_of_checkpoints_metrics_and_logs(s3_bucket, tmp_path, caplog, layout):
    import s3fs

    from jobs.train_gpt import TrainConfig, train

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    make_token_dataset(tmp_path / "ds", shards=3, rows=8)
    fs.put(str(tmp_path / "ds"), f"{bucket}/tokens", recursive=True)
    secret_opts = json.dumps(_secret_opts(opts["client_kwargs"]["endpoint_url"]))
    with caplog.at_level("DEBUG"):
        train(TrainConfig(data=f"s3://{bucket}/tokens", out=f"s3://{bucket}/run", storage_options=secret_opts,
                          metrics=str(tmp_path / "metrics.jsonl"), global_batch=8, max_steps=2, ckpt_every=1,
                          log_every=1, precision="fp32", checkpoint_format=layout))
    blobs = _objects(fs, f"{bucket}/run")
    if layout == "full":
        assert sum(p.endswith(".pt") for p in blobs) == 2
        from pipelines.consumer.checkpoints import load_latest

        config = load_latest(f"s3://{bucket}/run", opts)["config"]
    else:  # every rank's shard files, DCP's metadata and the train state, of both steps
        assert sum(p.endswith(".metadata") for p in blobs) == 2 and sum(p.endswith(".distcp") for p in blobs) >= 2
        config = json.loads(fs.cat_file(f"{bucket}/run/step-00000002/train_state.json"))["config"]
    _assert_clean({**blobs, "metrics": (tmp_path / "metrics.jsonl").read_bytes(), "log": caplog.text.encode()})
    assert config["storage_options"]["secret"] == "***" and config["data"] == f"s3://{bucket}/tokens"


def test_log_lines_mask_remembered_secrets(caplog):
    import logging

    from pipelines.contract.redact import redact, remember

    remember({"client_kwargs": {"aws_secret_access_key": SECRET}})
    with caplog.at_level("INFO"):
        logging.getLogger("some.library").info("request failed with %s", {"secret": SECRET})
    assert SECRET not in caplog.text and "***" in caplog.text
    assert redact({"key": ACCESS, "endpoint_url": "http://x", "url": f"s3://{ACCESS}:{SECRET}@b/k"}) == {
        "key": "***", "endpoint_url": "http://x", "url": "s3://***@b/k"}


def test_storage_options_from_a_file_and_bad_options_are_one_line_errors(tmp_path):
    (tmp_path / "opts.json").write_text('{"anon": true}')
    from jobs.cli import UsageError, storage_options

    assert storage_options(f"@{tmp_path / 'opts.json'}") == {"anon": True}
    for bad, message in [("{not json", "not valid JSON"), ("[1]", "JSON object"), (f"@{tmp_path}/none", "cannot read")]:
        with pytest.raises(UsageError, match=message):
            storage_options(bad)
    done = subprocess.run([sys.executable, "-m", "jobs.tokenize", "--input", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "o"), "--storage-options", "{oops"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "not valid JSON" in done.stderr


# ---------------------------------------------------------------- servers
def _listening(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port`` (IPv4, from /proc/net/tcp)."""
    out = []
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                out.append(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return out


def test_local_s3_script_listens_on_loopback_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["bash", str(ROOT / "infra" / "local-s3.sh"), str(port)],
                            env={**os.environ, "VENV": str(Path(sys.executable).parents[1])},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not _listening(port) and time.time() < deadline:
            time.sleep(0.1)
        assert _listening(port) == ["127.0.0.1"]
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_embedded_ray_refuses_clients_without_its_token(tmp_path):
    """Ray's processes listen on every interface; the embedded instance keeps token auth on, so a
    client elsewhere (here: one without the token file) cannot join it and run code. The cluster
    runs in a child process, so this test leaves no Ray behind in the test process."""
    host = f"""
import os, subprocess, sys
from pipelines.ray_runtime import ray_session
import ray
with ray_session(num_cpus=1):
    gcs = ray.get_runtime_context().gcs_address
    env = {{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}}
    env.update(HOME={str(tmp_path)!r}, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    probe = f"import ray; ray.init(address='{{gcs}}'); print('JOINED')"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    print("PROBE", done.returncode, "JOINED" in done.stdout)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", host], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert "PROBE" in done.stdout, done.stderr[-2000:]
    returncode, joined = done.stdout.split("PROBE")[1].split()
    assert returncode != "0" and joined == "False"
