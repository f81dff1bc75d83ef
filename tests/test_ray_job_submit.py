"""``ray job submit --working-dir . -- python -m jobs.tokenize ...`` against a real local Ray head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_data import jpeg_bytes, write_tar

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    """A head node in its own process group, stopped by signal (not ``ray stop``, which would end
    every Ray process on the machine)."""
    import ray

    ray.shutdown()
    # Ray's unix sockets live under --temp-dir and must fit in 107 bytes: keep the path short.
    temp_dir = tempfile.mkdtemp(prefix="ray")
    gcs, dash = _free_port(), _free_port()
    # As with an activated virtualenv: the job's ``python`` is this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                if head.poll() is None:
                    os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not come up")
            time.sleep(0.5)
    try:
        yield address, env
    finally:
        # SIGTERM would drain the node for 30 s first; the processes share the group, end them all.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_tokenize_under_ray_job_submit(tmp_path, ray_head):
    address, env = ray_head
    write_tar(tmp_path / "in" / "a.tar", [(f"k{i}", {"jpg": jpeg_bytes(i), "cls": b"1"}) for i in range(4)])
    out = tmp_path / "out"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "-m", "jobs.tokenize", "--input", str(tmp_path / "in"), "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["images"] == 4
