"""infra/local-stack.sh end to end: S3 server and Ray head on 127.0.0.1, tokenization and GPT training
through `ray job submit`, sampling from the checkpoint on S3; nothing left running afterwards."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _left(groups: set[int]) -> list[str]:
    """Live processes in the stack's process groups (each service runs in a group of its own: the Ray
    head's raylet, GCS and workers included)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) in groups and not line.split()[2].startswith("Z")]


def test_local_stack_end_to_end_and_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    done = subprocess.run(["bash", "infra/local-stack.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("succeeded") + done.stderr.count("succeeded") >= 2  # both jobs, through ray job submit
    assert Image.open(tmp_path / "samples.png").size[0] > 0
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2  # the S3 server and the Ray head
    deadline = time.time() + 20
    while _left(set(pids)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _left(set(pids)), _left(set(pids))
