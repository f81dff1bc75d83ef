"""jobs.sample end to end on tiny checkpoints: the labelled grid and the ADM .npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.sample import SampleConfig, run
from vfmtok_core import VFMTokenizer
from vfmtok_core.gpt import GPT


def _checkpoints(tmp_path):
    tok = VFMTokenizer.from_config("tiny", seed=1)
    torch.save({"ema": {k: v for k, v in tok.state_dict().items() if not k.startswith("dinov2.")}}, tmp_path / "tok.pt")
    gpt = GPT.from_config("GPT-tiny", seed=2, vocab_size=1024)
    with torch.no_grad():
        gpt.output.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    torch.save({"ema": gpt.state_dict()}, tmp_path / "gpt.pt")
    return dict(gpt=str(tmp_path / "gpt.pt"), tokenizer=str(tmp_path / "tok.pt"), size="GPT-tiny", config="tiny")


def test_grid(tmp_path):
    paths = _checkpoints(tmp_path)
    out = run(SampleConfig(out=str(tmp_path / "g.png"), classes="1,2", per_class=3, image_size=64, **paths))
    img = Image.open(out)
    assert img.size == (3 * 68 + 4, 2 * (68 + 14) + 4)


def test_npz_is_adm_format_and_seeded(tmp_path):
    paths = _checkpoints(tmp_path)
    cfg = dict(num=5, batch_size=2, cfg_scale=2.0, top_k=100, seed=7, **paths)
    a = np.load(run(SampleConfig(out=str(tmp_path / "a.npz"), **cfg)))
    b = np.load(run(SampleConfig(out=str(tmp_path / "b.npz"), **cfg)))
    assert a["arr_0"].shape == (5, 256, 256, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].shape == (5,) and a["arr_1"].max() < 1000
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def _npz_bytes(tmp_path, name: str, **kw) -> bytes:
    settings = dict(num=10, batch_size=3, cfg_scale=2.0, top_k=50, seed=3, image_size=32, **_checkpoints(tmp_path))
    out = run(SampleConfig(out=str(tmp_path / f"{name}.npz"), **{**settings, **kw}))
    assert not (tmp_path / f"{name}.npz.parts").exists()  # the chunks are gone once assembled
    return out.read_bytes()


def test_npz_bytes_do_not_depend_on_the_number_of_workers(tmp_path):
    from pipelines.ray_runtime import ray_session

    with ray_session(num_cpus=3):
        on_ray = [_npz_bytes(tmp_path, f"w{n}", workers=n) for n in (1, 2, 3)]
    here = _npz_bytes(tmp_path, "here")
    assert on_ray[0] == on_ray[1] == on_ray[2] == here
    batch = np.load(tmp_path / "w3.npz")
    assert batch["arr_0"].shape == (10, 32, 32, 3) and batch["arr_1"].dtype == np.int64
    # Chunks are seeded one by one: another chunk size samples other images.
    assert _npz_bytes(tmp_path, "b5", batch_size=5) != here


def test_torchrun_ranks_write_the_same_npz(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    paths = _checkpoints(tmp_path)
    args = ["--num-samples", "10", "--batch-size", "3", "--cfg-scale", "2.0", "--top-k", "50", "--seed", "3", "--image-size", "32",
            *[f"--{k.replace('_', '-')}={v}" for k, v in paths.items()], "--out", str(tmp_path / "ranks.npz")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "-m", "jobs.sample", *args],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ranks.npz").read_bytes() == _npz_bytes(tmp_path, "one")


def test_a_crashed_run_keeps_its_chunks_and_resumes(tmp_path, caplog):
    paths = _checkpoints(tmp_path)
    cfg = SampleConfig(out=str(tmp_path / "r.npz"), num=10, batch_size=3, seed=3, image_size=32, **paths)
    parts = tmp_path / "r.npz.parts"
    (parts / "chunk-000002.npy").mkdir(parents=True)  # chunk 2 cannot be written: the run dies there
    with pytest.raises(OSError):
        run(cfg)
    kept = {p.name: p.stat().st_ino for p in parts.glob("chunk-*.npy") if p.is_file()}
    assert sorted(kept) == ["chunk-000000.npy", "chunk-000001.npy"]
    (parts / "chunk-000002.npy").rmdir()
    with caplog.at_level("INFO", logger="jobs.sample"):
        resumed = run(cfg).read_bytes()
    assert "resuming: 2 of 4 chunks already sampled" in caplog.text
    assert resumed == _npz_bytes(tmp_path, "ref", cfg_scale=cfg.cfg_scale, top_k=cfg.top_k)


def test_labels_are_balanced_or_uniform_and_seeded():
    from jobs.sample_npz import sample_labels

    balanced = sample_labels(50000, 1000, "balanced", seed=0)
    assert np.bincount(balanced, minlength=1000).tolist() == [50] * 1000
    assert len(set(balanced[:1000].tolist())) > 500  # shuffled, not class after class
    uneven = sample_labels(2500, 1000, "balanced", seed=0)
    assert sorted(set(np.bincount(uneven, minlength=1000).tolist())) == [2, 3]
    random = sample_labels(50000, 1000, "random", seed=0)
    assert np.bincount(random, minlength=1000).std() > 3  # upstream's draws: not balanced
    assert np.array_equal(sample_labels(50000, 1000, "random", seed=0), random)
    assert not np.array_equal(sample_labels(50000, 1000, "balanced", seed=1), balanced)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    paths = _checkpoints(tmp_path)
    args = ["--num", "30", "--batch-size", "2", "--seed", "3", "--image-size", "32",
            *[f"--{k.replace('_', '-')}={v}" for k, v in paths.items()], "--out", str(tmp_path / "k.npz")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sample", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "k.npz.parts"
    deadline = time.time() + 120
    while len(list(parts.glob("chunk-*.npy"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list(parts.glob("chunk-*.npy")))
    assert 3 <= kept < 15 and not (tmp_path / "k.npz").exists(), "the run finished before it could be killed"
    done = subprocess.run([sys.executable, "-m", "jobs.sample", *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming: {kept} of 15 chunks already sampled" in done.stderr
    reference = run(SampleConfig(out=str(tmp_path / "ref.npz"), num=30, batch_size=2, seed=3, image_size=32, **paths))
    assert (tmp_path / "k.npz").read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("extra, message", [
    (dict(gpt="{tmp}/missing.pt"), "checkpoint not found"),
    (dict(gpt="{tmp}"), "jobs.export_gpt"),  # a training run's folder, not an exported file
    (dict(classes="1,x"), "comma-separated class ids"),
    (dict(classes="1,1000"), "outside [0, 1000)"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    from jobs.sample import main

    paths = {**_checkpoints(tmp_path), **{k: v.format(tmp=tmp_path) for k, v in extra.items()}}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--image-size", "64", "--per-class", "1", "--out", str(tmp_path / "g.png")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("error: ")
