"""Chaos: a run of a few thousand images whose tokenizer actors are SIGKILLed again and again while
its driver is killed twice and the command rerun. The final output must equal an uninterrupted
run's, shard for shard and checksum for checksum."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobs.tokenize import TokenizeConfig, run
from pipelines.ray_runtime import ray_session
from tests.pipeline_data import png_bytes, write_tar
from tests.processes import command_line, descendants

ROOT = Path(__file__).resolve().parents[1]
TARS, PER_TAR = 48, 50  # 2,400 images, one work item per tar


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


class ActorKiller(threading.Thread):
    """SIGKILLs one tokenizer actor of the driver's (embedded) cluster every ``period`` seconds."""

    def __init__(self, period: float = 1.5):
        super().__init__(daemon=True)
        self.period, self.driver, self.kills = period, None, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            driver = self.driver
            if driver is None or driver.poll() is not None:
                continue
            actors = [p for p in descendants(driver.pid) if command_line(p).startswith("ray::TokenizerWorker")]
            if actors:
                try:
                    os.kill(actors[self.kills % len(actors)], signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def test_actors_killed_repeatedly_and_driver_killed_twice(tmp_path):
    for t in range(TARS):
        write_tar(tmp_path / "in" / f"part{t:03d}.tar",
                  [(f"k{i:02d}", {"png": png_bytes(t * 1000 + i, size=(24, 20)), "cls": str(t % 7).encode()})
                   for i in range(PER_TAR)])
    with ray_session(num_cpus=2):
        reference = run(TokenizeConfig(input=str(tmp_path / "in"), output=str(tmp_path / "ref"), variants="center,flip"))
    assert reference["complete"] and reference["images"] == TARS * PER_TAR

    out = tmp_path / "out"
    commits = out / "_state" / "commits"
    cmd = [sys.executable, "-m", "jobs.tokenize", "--input", str(tmp_path / "in"), "--output", str(out),
           "--variants", "center,flip", "--workers", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    killer = ActorKiller()
    killer.start()
    try:
        for stop_after in (8, 24):  # two driver deaths, then a run to the end
            killer.driver = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 180
            while time.time() < deadline and killer.driver.poll() is None and not (
                commits.exists() and len(os.listdir(commits)) >= stop_after
            ):
                time.sleep(0.05)
            assert killer.driver.poll() is None, "the driver should still be running when it is killed"
            os.killpg(killer.driver.pid, signal.SIGKILL)
            killer.driver.wait()
        killer.driver = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = killer.driver.communicate(timeout=300)
        assert killer.driver.returncode == 0, stderr[-3000:]
    finally:
        killer.stop()
    assert killer.kills >= 3, f"only {killer.kills} actor kills: the chaos did not happen"
    assert _manifest(out)["shards"] == _manifest(tmp_path / "ref")["shards"]
    assert _manifest(out)["totals"] == _manifest(tmp_path / "ref")["totals"]
