"""The Quickstart's ``make demo``: its recipe as written in the Makefile, run into a temporary
folder, gives a finished token dataset, a GPT checkpoint exported to one file and a sample grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfmtok_core.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]


def _make_demo(out: Path) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parents[1]
    # -o: the environment this test runs in is the demo's; never bootstrap another one here.
    cmd = ["make", "-s", "-o", f"{venv}/.ready-test", "demo", f"VENV={venv}", f"DEMO={out}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_make_demo_runs_every_step(tmp_path):
    demo = tmp_path / "demo"
    done = _make_demo(demo)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((demo / "tokens" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["images"] == 6 and manifest["variants"] == ["center", "flip"]

    metrics = [json.loads(line) for line in (demo / "gpt" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30 and metrics[-1]["loss"] < metrics[0]["loss"]
    exported = GPT.from_pretrained(str(demo / "gpt-tiny.pt"), size="GPT-tiny")
    assert not torch.equal(exported.tok_embeddings.weight, GPT.from_config("GPT-tiny", seed=0, vocab_size=1024).tok_embeddings.weight)

    grid = np.asarray(Image.open(demo / "samples.png").convert("RGB"))
    assert grid.shape == (3 * (256 + 4 + 14) + 4, 3 * (256 + 4) + 4, 3)
    assert grid[20:270, 10:250].std() > 10  # a decoded image, not a blank canvas
