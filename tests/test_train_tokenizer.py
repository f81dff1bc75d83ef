"""``jobs.train_tokenizer``: a short run of the whole objective, the released checkpoint layout, exact
resume after a kill, DDP against one process, Ray Train, --init, and what a trained tokenizer
is for (loading, tokenizing, reconstructing better than an untrained one)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.tokenize import TokenizeConfig
from jobs.tokenize import run as tokenize
from jobs.train_tokenizer import TrainTokenizerConfig, train
from pipelines.contract.inspect import load_tokens
from pipelines.producer.samples import BUNDLED_PHOTOS, bundled_photos
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import center_crop, to_tensor

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(config="tiny", global_batch=4, precision="fp32", log_every=1, image_every=0, ckpt_every=1000)
TERMS = ("reconstruction", "perceptual", "codebook", "commit", "semantic", "disc", "loss")
RELEASED_LAYOUT = {"model", "ema", "optimizer", "discriminator", "optimizer_disc", "steps", "args"}


def _cfg(data: Path, out: Path, **kw) -> TrainTokenizerConfig:
    return TrainTokenizerConfig(data=str(data), out=str(out), **{**FAST, **kw})


def _metrics(out: Path) -> dict[int, dict]:
    """Metrics by step; a resumed run may log a step twice, and the later line wins."""
    return {rec["step"]: rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


# One thread everywhere: CPU kernels sum in an order that depends on the thread count.
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _run(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.run([*cmd, "-m", "jobs.train_tokenizer", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight real photos, shrunk so that decoding them costs little."""
    root = tmp_path_factory.mktemp("photos")
    for name, img in bundled_photos(BUNDLED_PHOTOS + ("retina", "camera")):
        img.thumbnail((200, 200))
        img.save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos) -> Path:
    """Twelve steps, the GAN terms from step 6, a fast EMA so that its weights have moved."""
    out = tmp_path_factory.mktemp("run")
    train(_cfg(photos, out, max_steps=12, disc_start=6, lr=1e-3, ema=0.5, warmup_epochs=0, image_every=6, ckpt_every=6))
    return out


def test_every_term_is_finite_and_moves_and_the_gan_starts_at_disc_start(trained):
    m = _metrics(trained)
    assert sorted(m) == list(range(1, 13))
    for rec in m.values():
        assert all(math.isfinite(rec[k]) for k in TERMS + ("generator_adv", "logits_real", "logits_fake", "psnr"))
    for k in TERMS:
        assert m[1][k] != m[12][k], k
    assert m[12]["reconstruction"] < m[1]["reconstruction"] and m[12]["psnr"] > m[1]["psnr"]
    # Steps 1..6 are optimiser steps 0..5, before --disc-start 6: no adversarial term, no disc update.
    assert all(m[s]["generator_adv"] == 0 and m[s]["adversarial_weight"] == 0 and m[s]["disc_grad_norm"] == 0 for s in range(1, 7))
    assert all(m[s]["generator_adv"] > 0 and m[s]["adversarial_weight"] == 0.5 and m[s]["disc_grad_norm"] > 0 for s in range(7, 13))
    assert 0 < m[12]["codebook_usage"] <= 1
    grid = Image.open(trained / "samples" / "step-00000012.png")
    assert grid.size == (4 * 112, 2 * 112)


def test_checkpoints_have_the_released_layout_and_no_backbone(trained):
    latest = json.loads((trained / "latest.json").read_text())
    assert latest["step"] == 12
    state = torch.load(trained / latest["path"], map_location="cpu", weights_only=True)
    assert RELEASED_LAYOUT <= set(state)
    assert state["steps"] == 12
    assert set(state["model"]) == set(state["ema"])
    assert not any("dinov2" in k or "backbone" in k for k in state["model"])
    assert not any("backbone" in k for k in state["discriminator"])
    assert state["args"]["disc_start"] == 6
    # EMA (decay 0.5) differs from the trained weights, buffers are copied as trained.
    key = "decoder.conv_out.weight"
    assert not torch.equal(state["ema"][key], state["model"][key])


def test_a_trained_tokenizer_loads_tokenizes_and_beats_the_untrained_one(trained, photos, tmp_path):
    ckpt = str(trained / "step-00000012.pt")
    tok = VFMTokenizer.from_pretrained(ckpt, dinov2=str(trained / "dinov2.pth"), config="tiny")
    untrained = VFMTokenizer.from_config("tiny", seed=0)
    assert tok.fingerprint != untrained.fingerprint
    # The frozen backbone is the run's: the seeded random one it started from.
    assert all(torch.equal(a, b) for a, b in zip(tok.dinov2.state_dict().values(), untrained.dinov2.state_dict().values()))
    names = sorted(p.name for p in photos.iterdir())
    x = torch.cat([to_tensor(center_crop(Image.open(photos / n).convert("RGB"), 112)) for n in names])

    def error(model):
        return float(((model.decode(model.encode(x)) - x) ** 2).mean())

    assert error(tok) < 0.8 * error(untrained)
    summary = tokenize(TokenizeConfig(input=str(photos), output=str(tmp_path / "tok"), tokenizer=ckpt,
                                      dinov2=str(trained / "dinov2.pth"), config="tiny", workers=1))
    assert summary["images"] == 8 and not summary["random_weights"]
    manifest, rows, _ = load_tokens(str(tmp_path / "tok"))
    assert manifest["fingerprint"] == tok.fingerprint
    rows = rows.sort("key")
    expected = tok.encode(x).numpy()
    assert [k + ".png" for k in rows["key"].to_list()] == names
    assert np.array_equal(np.array(rows["tokens"].to_list()).reshape(8, -1)[:, :256], expected)


def test_a_killed_run_resumes_with_the_same_losses(photos, tmp_path):
    args = ["--data", str(photos), "--config", "tiny", "--global-batch", "4", "--precision", "fp32",
            "--log-every", "1", "--image-every", "0", "--disc-start", "3", "--lr", "1e-3", "--max-steps", "9"]
    ref = tmp_path / "ref"
    assert _run(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train_tokenizer", *args, "--out", str(out), "--ckpt-every", "3"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "latest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads((out / "latest.json").read_text())["step"]
    assert saved < 9, "the run finished before it could be killed"
    done = _run(*args, "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    ref_m, run_m = _metrics(ref), _metrics(out)
    assert sorted(run_m) == list(range(1, 10))
    for step in range(saved + 1, 10):  # bit for bit
        assert {k: run_m[step][k] for k in TERMS + ("generator_adv",)} == {k: ref_m[step][k] for k in TERMS + ("generator_adv",)}, step


def test_ddp_on_two_processes_matches_one_process(photos, tmp_path):
    # Dropout masks are drawn per rank, so the comparison runs without dropout; the GAN terms start
    # after the compared steps, as the discriminator's batch norm groups by each rank's batch.
    args = ["--data", str(photos), "--config", "tiny", "--global-batch", "4", "--precision", "fp32", "--dropout", "0",
            "--log-every", "1", "--image-every", "0", "--lr", "1e-3", "--warmup-epochs", "0", "--max-steps", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = _run(*args, "--out", str(one))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _run(*args, "--out", str(two), nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert m2[3]["world_size"] == 2
    assert m1[1]["reconstruction"] != m1[3]["reconstruction"]
    for step in (1, 2, 3):
        for k in ("reconstruction", "perceptual", "codebook", "commit", "semantic", "loss"):
            assert m2[step][k] == pytest.approx(m1[step][k], rel=1e-4), (step, k)
    w1 = torch.load(one / "step-00000003.pt", weights_only=True)["model"]
    w2 = torch.load(two / "step-00000003.pt", weights_only=True)["model"]
    # Adam turns a float-rounding difference in a near-zero gradient into up to one lr-sized step on
    # that weight, so the weights are compared as a whole: how far apart the two runs ended, over
    # how far they moved from the initial weights.
    w0 = VFMTokenizer.from_config("tiny", seed=0).state_dict()
    keys = [k for k in w1 if w1[k].is_floating_point() and "codebook_used" not in k]

    def l2(a, b):
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5

    assert l2(w1, w2) < 5e-3 * l2(w1, w0), (l2(w1, w2), l2(w1, w0))


def test_ray_train_runs_the_same_loop_on_two_workers(photos, tmp_path):
    from jobs.train_tokenizer import run_on_ray

    latest = run_on_ray(_cfg(photos, tmp_path / "o", max_steps=2, ray_workers=2, dropout=0.0))
    assert latest["step"] == 2
    assert _metrics(tmp_path / "o")[2]["world_size"] == 2


def test_init_starts_from_a_trained_tokenizer(trained, photos, tmp_path):
    ema = torch.load(trained / "step-00000012.pt", weights_only=True)["ema"]
    # A step at learning rate 0 keeps the starting weights: they are the --init file's EMA (the
    # step runs the bf16 path: LPIPS in fp32 inside it, the discriminator under autocast).
    train(_cfg(photos, tmp_path / "ft", max_steps=1, lr=0.0, warmup_epochs=0, precision="bf16", init=str(trained / "step-00000012.pt"),
               dinov2=str(trained / "dinov2.pth")))
    after = torch.load(tmp_path / "ft" / "step-00000001.pt", weights_only=True)["model"]
    assert all(torch.equal(after[k], ema[k]) for k in ema if "codebook_used" not in k)


@pytest.mark.parametrize("args, message", [
    ([], "--data is required"),
    (["--data", "/nonexistent/images"], "does not exist"),
    (["--data", "{photos}", "--init", "x.pt"], "--init needs --dinov2"),
    (["--data", "{photos}", "--lpips-vgg16", "vgg.pth"], "go together"),
    (["--data", "{photos}", "--dinov2", "/nonexistent/dinov2.pth"], "--dinov2 /nonexistent/dinov2.pth does not exist"),
])
def test_user_mistakes_are_one_line_and_exit_2(photos, tmp_path, args, message):
    done = _run(*[a.format(photos=photos) for a in args], "--out", str(tmp_path / "o"), "--max-steps", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 400


def test_s3_data_and_checkpoints(photos, tmp_path, s3_bucket):
    import fsspec

    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(photos) + "/", f"{bucket}/photos/", recursive=True)
    out = f"s3://{bucket}/runs/tok"
    train(_cfg(f"s3://{bucket}/photos", out, max_steps=2, image_every=2, storage_options=json.dumps(opts),
               metrics=str(tmp_path / "metrics.jsonl")))
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/tok")}
    assert {"latest.json", "step-00000002.pt", "dinov2.pth", "train-index.parquet", "samples"} <= names
    assert not any(n.startswith(".tmp-") for n in names)  # atomic writes leave nothing behind
    tok = VFMTokenizer.from_pretrained(f"{out}/step-00000002.pt", dinov2=f"{out}/dinov2.pth", config="tiny", storage_options=opts)
    state = torch.load(fs.open(f"{bucket}/runs/tok/step-00000002.pt"), weights_only=True)
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in state["ema"].items())
    assert "testing" not in json.dumps(state["args"])  # the credentials were redacted
    assert _metrics(tmp_path)[2]["world_size"] == 1


def _average_on_rank(rank: int, init: str, result: str) -> None:
    import torch.distributed as dist

    from jobs.train_tokenizer import _average_gradients

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    layer = torch.nn.Linear(3, 2)
    for p in layer.parameters():
        p.grad = torch.full_like(p, float(rank + 1)) * torch.arange(p.numel()).view_as(p)
    _average_gradients(layer, 2)
    torch.save([p.grad for p in layer.parameters()], f"{result}.{rank}")
    dist.destroy_process_group()


def test_discriminator_gradients_are_averaged_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_on_rank, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path / "grads")), nprocs=2)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        # Rank 0 held 1 x arange, rank 1 held 2 x arange: both now hold the mean, 1.5 x arange.
        assert all(torch.equal(g, 1.5 * torch.arange(g.numel()).view_as(g).float()) for g in grads)


def test_the_first_log_line_after_a_resume_averages_the_steps_it_ran(photos, tmp_path):
    every = _cfg(photos, tmp_path / "every", max_steps=4, lr=1e-3)  # one line per step
    train(every)
    train(_cfg(photos, tmp_path / "r", max_steps=3, ckpt_every=3, lr=1e-3, log_every=2))
    train(_cfg(photos, tmp_path / "r", max_steps=4, ckpt_every=3, lr=1e-3, log_every=2, resume=True))
    # Step 4 is the resumed run's only step before its first line: that line is step 4 alone.
    assert _metrics(tmp_path / "r")[4]["reconstruction"] == pytest.approx(_metrics(tmp_path / "every")[4]["reconstruction"], rel=1e-6)


def _index_on_rank(rank: int, init: str, inputs: list[str], outs: list[str], reads_file: str) -> None:
    """``_index`` for each input on one of 2 gloo ranks, recording every file this rank read."""
    import torch.distributed as dist

    import pipelines.producer.training_images as images
    from jobs.train_tokenizer import _index

    reads: list[str] = []
    read_item, row_group_rows = images.read_item, images._row_group_rows
    images.read_item = lambda item, so: (reads.append(item.url), read_item(item, so))[1]
    images._row_group_rows = lambda url, so: (reads.append(url), row_group_rows(url, so))[1]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    for data, out in zip(inputs, outs):
        _index(_cfg(Path(data), Path(out)), {}, rank, 2)
        _index(_cfg(Path(data), Path(out)), {}, rank, 2)  # a restart reads the stored index, no input
    Path(f"{reads_file}.{rank}").write_text(json.dumps(reads))
    dist.destroy_process_group()


def test_ranks_split_the_counting_of_tars_and_parquet_footers_and_store_the_one_process_index(tmp_path):
    """A tar has to be read whole to count its samples: on one rank, ImageNet-21k's would outlast
    the collectives' timeout the other ranks wait under. Each file is read once, by one rank."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    from jobs.train_tokenizer import INDEX_FILE
    from pipelines.producer.training_images import ImageIndex, build_index
    from tests.pipeline_data import png_bytes, write_tar

    samples = iter(range(100))
    for t, n in enumerate([3, 1, 4, 2, 5]):
        write_tar(tmp_path / "wds" / f"{t}.tar", [(f"s{s}", {"png": png_bytes(s, (8, 8)), "cls": b"0"}) for s in (next(samples) for _ in range(n))])
    (tmp_path / "pq").mkdir()
    for f, n in enumerate([5, 2, 7]):
        keys = [f"p{f}-{i}" for i in range(n)]
        table = pa.table({"key": keys, "image": [png_bytes(i, (8, 8)) for i in range(n)], "label": [0] * n})
        pq.write_table(table, tmp_path / "pq" / f"{f}.parquet", row_group_size=3)
    inputs = [str(tmp_path / "wds"), str(tmp_path / "pq")]
    outs = [str(tmp_path / "out-wds"), str(tmp_path / "out-pq")]
    mp.spawn(_index_on_rank, args=(f"file://{tmp_path / 'rdzv'}", inputs, outs, str(tmp_path / "reads")), nprocs=2)

    reads = [json.loads((tmp_path / f"reads.{rank}").read_text()) for rank in range(2)]
    files = sorted(str(p) for p in [*(tmp_path / "wds").iterdir(), *(tmp_path / "pq").iterdir()])
    assert sorted(u.removeprefix("file://") for u in reads[0] + reads[1]) == files  # each once, restarts none
    assert reads[0] and reads[1]
    for data, out, counts in zip(inputs, outs, ([3, 1, 4, 2, 5], [3, 2, 2, 3, 3, 1])):
        stored, alone = ImageIndex.from_bytes((Path(out) / INDEX_FILE).read_bytes()), build_index(data)
        assert stored.counts.tolist() == alone.counts.tolist() == counts
        assert stored.plan.table.equals(alone.plan.table) and (stored.fmt, stored.url) == (alone.fmt, data)
