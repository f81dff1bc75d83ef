"""The GPT trainer: streams shards, checkpoints atomically, resumes exactly (single process, torchrun
DDP and FSDP on gloo, killed mid-run), reads S3, and refuses tokens from another tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli import UsageError
from jobs.train_gpt import TrainConfig, train
from pipelines.consumer.streaming import DatasetMismatch
from tests.pipeline_data import make_token_dataset
from tests.processes import descendants

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(global_batch=8, log_every=1, precision="fp32", num_workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens") / "ds"
    make_token_dataset(root, shards=6, rows=20)
    return root


EXACT = ["--log-every", "1", "--precision", "fp32", "--dropout", "0", "--class-dropout", "0", "--lr", "1e-2"]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``jobs.train_gpt`` on ``nproc`` local processes (gloo), which must succeed."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, f"--nproc_per_node={nproc}", "-m", "jobs.train_gpt", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run may log a step twice; the values must agree
    return out


def test_resume_repeats_the_uninterrupted_run(tmp_path, data):
    full = tmp_path / "full"
    train(TrainConfig(data=str(data), out=str(full), max_steps=20, ckpt_every=5, **FAST))  # crosses an epoch (15 steps)
    part = tmp_path / "part"
    train(TrainConfig(data=str(data), out=str(part), max_steps=7, ckpt_every=5, num_workers=0, global_batch=8,
                      log_every=1, precision="fp32"))
    # The run "died" after step 7; the newest checkpoint is step 7 (the final one).
    train(TrainConfig(data=str(data), out=str(part), max_steps=20, ckpt_every=5, resume=True, **{**FAST, "num_workers": 2}))
    assert _losses(part / "metrics.jsonl") == _losses(full / "metrics.jsonl")


def test_existing_checkpoints_need_resume(tmp_path, data):
    train(TrainConfig(data=str(data), out=str(tmp_path / "o"), max_steps=1, **FAST))
    with pytest.raises(UsageError, match="--resume"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "o"), max_steps=2, **FAST))


def test_resume_refuses_tokens_of_another_tokenizer(tmp_path, data):
    train(TrainConfig(data=str(data), out=str(tmp_path / "o"), max_steps=1, **FAST))
    other = tmp_path / "other"
    make_token_dataset(other, shards=6, rows=20, fingerprint="vfmtok-l14-336-ffff")
    with pytest.raises(DatasetMismatch, match="cannot be mixed"):
        train(TrainConfig(data=str(other), out=str(tmp_path / "o"), max_steps=2, resume=True, **FAST))


def test_data_and_checkpoints_on_s3(tmp_path, data, s3_bucket):
    import s3fs
    import torch

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(data), f"{bucket}/tokens", recursive=True)
    cfg = dict(data=f"s3://{bucket}/tokens", out=f"s3://{bucket}/run", storage_options=json.dumps(opts),
               metrics=str(tmp_path / "m.jsonl"), ckpt_every=2)
    train(TrainConfig(max_steps=2, **cfg, **FAST))
    train(TrainConfig(max_steps=4, resume=True, **cfg, **FAST))
    latest = json.loads(fs.cat_file(f"{bucket}/run/latest.json"))
    assert latest == {"step": 4, "path": "step-00000004", "format": "sharded"}
    assert fs.exists(f"{bucket}/run/step-00000002/.metadata")  # each rank's shards plus DCP's metadata
    state = json.loads(fs.cat_file(f"{bucket}/run/step-00000004/train_state.json"))
    assert state["data"]["consumed"] == 32 and state["step"] == 4
    # The export reads the shards from S3 into the released single-file layout.
    from jobs.export_gpt import ExportConfig, export

    export(ExportConfig(checkpoint=f"s3://{bucket}/run", out=str(tmp_path / "gpt.pt"), storage_options=json.dumps(opts)))
    assert isinstance(torch.load(tmp_path / "gpt.pt", weights_only=True)["ema"]["norm.weight"], torch.Tensor)


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (they do not share its process group)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_killed_and_resumed(tmp_path, data, parallel):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    base = [torchrun, "--nproc_per_node=2", "-m", "jobs.train_gpt", "--data", str(data), "--global-batch", "8",
            "--max-steps", "14", "--ckpt-every", "3", "--log-every", "1", "--precision", "fp32", "--num-workers", "1"]
    if parallel == "fsdp":
        base.append("--fsdp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([*base, "--out", str(tmp_path / "ref")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    proc = subprocess.Popen([*base, "--out", str(out)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest.json").exists():
        time.sleep(0.01)
    _kill_tree(proc.pid)
    proc.wait()
    saved = json.loads((out / "latest.json").read_text())["step"]
    assert saved < 14, "the run should be killed before it finishes"

    resumed = subprocess.run([*base, "--out", str(out), "--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stderr
    ref_losses, run_losses = _losses(tmp_path / "ref" / "metrics.jsonl"), _losses(out / "metrics.jsonl")
    assert run_losses[saved + 1] == ref_losses[saved + 1]  # the next step, bit for bit
    assert run_losses == ref_losses


def test_ray_train_two_workers(tmp_path, data):
    from jobs.train_gpt import run_on_ray

    # No dropout and a large step size: losses then depend only on the weights and the global batches.
    exact = dict(FAST, dropout=0.0, class_dropout=0.0, lr=1e-2, max_steps=4)
    out = tmp_path / "o"
    latest = run_on_ray(TrainConfig(data=str(data), out=str(out), ckpt_every=2, ray_workers=2, **exact))
    assert latest["step"] == 4
    ref = tmp_path / "ref"
    train(TrainConfig(data=str(data), out=str(ref), **exact))
    # Two Ray Train workers (DDP) and one process consume the same global batches.
    ray_losses, single = _losses(out / "metrics.jsonl"), _losses(ref / "metrics.jsonl")
    assert max(single.values()) - min(single.values()) > 1e-3  # the run really moves
    assert ray_losses.keys() == single.keys()
    assert all(abs(ray_losses[k] - single[k]) < 2e-5 for k in single)
    # Two ranks really ran, each on its own samples.
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line)["world_size"] == 2 and json.loads(line)["distinct_rank_batches"] == 2


def test_skip_bad_shards_through_the_cli_counts_and_logs_each(tmp_path, data, capsys, caplog):
    import shutil

    from jobs.train_gpt import main

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "shards" / "shard-000001.parquet").unlink()  # missing
    # A valid Parquet shard of other content under shard 3's name: only the checksum can tell.
    shutil.copy(bad / "shards" / "shard-000004.parquet", bad / "shards" / "shard-000003.parquet")
    args = ["--data", str(bad), "--global-batch", "8", "--max-steps", "12", "--log-every", "1", "--precision", "fp32",
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--out", str(tmp_path / "strict")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "shard-00000" in err and "Traceback" not in err

    main([*args, "--out", str(tmp_path / "o"), "--skip-bad-shards"])
    logged = caplog.text
    assert "skipping: shard shards/shard-000001.parquet" in logged and "cannot be read" in logged
    assert "skipping: shard shards/shard-000003.parquet" in logged and "does not match its manifest checksum" in logged
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_shards"] == 2 and metrics[-1]["step"] == 12
    # 79 of epoch 0's 120 samples were readable: 10 batches (the last one short), then epoch 1.
    assert [m["epoch"] for m in metrics] == [0] * 10 + [1] * 2


def test_torchrun_resumes_with_another_world_size(tmp_path, data):
    exact = [*EXACT, "--global-batch", "12", "--num-workers", "1", "--data", str(data), "--ckpt-every", "3"]
    out = tmp_path / "run"
    _torchrun(2, *exact, "--out", str(out), "--max-steps", "3")
    # The resumed run also splits each rank's batch into 2 micro-batches (DDP syncs on the last).
    done = _torchrun(3, *exact, "--out", str(out), "--max-steps", "7", "--resume", "--grad-accum", "2")
    assert "resumed from step 3 (epoch 0, 36 samples into it)" in done.stderr
    train(TrainConfig(data=str(data), out=str(tmp_path / "ref"), max_steps=7, global_batch=12, log_every=1,
                      precision="fp32", dropout=0.0, class_dropout=0.0, lr=1e-2))
    ours, ref = _losses(out / "metrics.jsonl"), _losses(tmp_path / "ref" / "metrics.jsonl")
    assert ours.keys() == ref.keys() == set(range(1, 8))
    # 2 ranks, then 3, against 1: the same global batches (epoch 1 starts at step 6), losses equal up
    # to float reduction order.
    assert all(abs(ours[k] - ref[k]) < 1e-4 for k in ref)
    worlds = [json.loads(line)["world_size"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert worlds == [2, 2, 2, 3, 3, 3, 3]


def test_an_incomplete_dataset_is_refused_in_one_line_unless_followed(tmp_path, data, capsys):
    import shutil

    from jobs.train_gpt import main

    partial = tmp_path / "partial"
    shutil.copytree(data, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))  # a job still writing
    args = ["--data", str(partial), "--global-batch", "8", "--max-steps", "2", "--precision", "fp32", "--log-every", "1"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "--follow" in err and "incomplete" in err
    main([*args, "--out", str(tmp_path / "b"), "--follow"])
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 2


def test_gradient_accumulation_2x4_equals_1x8(tmp_path, data):
    import torch

    from pipelines.consumer.checkpoints import load_latest

    common = dict(data=str(data), max_steps=5, global_batch=8, log_every=1, precision="fp32", dropout=0.0,
                  class_dropout=0.0, lr=1e-2, checkpoint_format="full")
    train(TrainConfig(out=str(tmp_path / "one"), **common))
    train(TrainConfig(out=str(tmp_path / "two"), grad_accum=2, **common))
    train(TrainConfig(out=str(tmp_path / "eight"), grad_accum=8, **common))
    one, two, eight = (load_latest(str(tmp_path / n)) for n in ("one", "two", "eight"))
    assert one["data"] == two["data"] == eight["data"]  # the same samples consumed
    for name, p in one["model"].items():
        # Equal up to float summation order, which Adam amplifies where a gradient is near zero
        # (measured: at most 6e-5 after 5 steps of lr 1e-2, against parameter moves of ~0.05).
        assert torch.allclose(two["model"][name], p, atol=2e-4, rtol=0), name
        assert torch.allclose(eight["model"][name], p, atol=2e-4, rtol=0), name
    assert max(abs(p - one["model"][n]).max() for n, p in two["model"].items()) > 0  # really another path
    # Adam hides a gradient's scale; the loss and the gradient norm show it (a micro-batch loss not
    # divided by the number of micro-batches doubles both).
    metrics = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two", "eight")}
    for n in ("two", "eight"):
        for a, b in zip(metrics["one"], metrics[n]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_metrics_report_throughput_mfu_memory_and_data_wait(tmp_path, data):
    train(TrainConfig(data=str(data), out=str(tmp_path / "o"), max_steps=2, peak_tflops=0.001, **FAST))
    m = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * 256)
    assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] / 0.001)
    assert m["peak_memory_gb"] > 0.1 and 0 <= m["data_wait_share"] <= 1 and m["data_wait_s"] >= 0


# ---------------------------------------------------------------------------- sharded checkpoints
def test_export_loads_with_from_pretrained_and_gives_the_live_models_logits(tmp_path, data):
    import torch

    from jobs.export_gpt import ExportConfig, export
    from pipelines.consumer.checkpoints import load_latest
    from vfmtok_core.gpt import GPT

    exact = dict(data=str(data), max_steps=3, global_batch=8, log_every=1, precision="fp32", dropout=0.0, class_dropout=0.0)
    train(TrainConfig(out=str(tmp_path / "sharded"), **exact))
    train(TrainConfig(out=str(tmp_path / "full"), checkpoint_format="full", **exact))  # the same run, gathered
    live = load_latest(str(tmp_path / "full"))  # the weights the run ended with, in memory
    info = export(ExportConfig(checkpoint=str(tmp_path / "sharded"), out=str(tmp_path / "gpt.pt")))
    assert info["step"] == 3 and info["size"] == "GPT-tiny"
    labels, codes = torch.tensor([0, 3]), torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(0))
    for which in ("ema", "model"):
        reference = GPT.from_config("GPT-tiny", vocab_size=1024)
        reference.load_state_dict(live[which])
        file = tmp_path / f"{which}.pt"
        torch.save({which: torch.load(tmp_path / "gpt.pt", weights_only=True)[which]}, file)
        exported = GPT.from_pretrained(str(file), size="GPT-tiny")
        with torch.no_grad():
            assert torch.equal(exported(labels, codes), reference(labels, codes)), which


def test_fsdp_checkpoint_of_2_ranks_resumes_on_3_and_in_one_process(tmp_path, data):
    exact = [*EXACT, "--global-batch", "12", "--data", str(data), "--ckpt-every", "3", "--fsdp"]

    def run(nproc: int, out: Path, steps: int, *more: str) -> subprocess.CompletedProcess:
        return _torchrun(nproc, *exact, "--out", str(out), "--max-steps", str(steps), *more)

    run(2, tmp_path / "run", 3)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "single")
    resumed = run(3, tmp_path / "run", 6, "--resume")
    assert "resumed from step 3 (epoch 0, 36 samples into it)" in resumed.stderr
    run(3, tmp_path / "ref", 6)  # uninterrupted, 3 ranks
    ours, ref = _losses(tmp_path / "run" / "metrics.jsonl"), _losses(tmp_path / "ref" / "metrics.jsonl")
    assert ours.keys() == ref.keys() == set(range(1, 7))
    assert all(abs(ours[k] - ref[k]) < 1e-4 for k in ref)  # float reduction order only
    # The same sharded checkpoint resumed without FSDP, in one process.
    train(TrainConfig(data=str(data), out=str(tmp_path / "single"), max_steps=6, global_batch=12, log_every=1,
                      precision="fp32", dropout=0.0, class_dropout=0.0, lr=1e-2, resume=True))
    single = _losses(tmp_path / "single" / "metrics.jsonl")
    assert all(abs(single[k] - ref[k]) < 1e-4 for k in range(4, 7))


def test_an_async_save_killed_mid_write_leaves_the_previous_checkpoint_in_charge(tmp_path, data):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "jobs.train_gpt", "--data", str(data), "--out", str(out), "--size", "GPT-B",
            "--global-batch", "2", "--precision", "fp32", "--log-every", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([*base, "--max-steps", "40", "--ckpt-every", "1"], cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def published() -> int:
        try:
            return json.loads((out / "latest.json").read_text())["step"]
        except (FileNotFoundError, ValueError):
            return 0

    def writing() -> list:  # step folders whose save has not finished (DCP writes .metadata last)
        return [d for d in out.glob("step-*") if not (d / ".metadata").exists()]

    deadline = time.time() + 240
    try:
        # Wait until a save is being written after one was published (GPT-B's 1.4 GB takes a while).
        while time.time() < deadline and not (published() >= 1 and writing()):
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step = published()
    assert step >= 1 and writing(), "the kill should land mid-save"
    # What latest.json names is complete, and a resume continues from it.
    assert (out / f"step-{step:08d}" / ".metadata").exists() and (out / f"step-{step:08d}" / "train_state.json").exists()
    resumed = subprocess.run([*base, "--max-steps", str(step + 1), "--resume"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stderr
    assert published() == step + 1


def test_hsdp_two_replicas_of_two_shards_match_one_process(tmp_path, data):
    """Sharded within groups of 2 ranks, replicated across 2 groups (as across 2 nodes), with a
    sharded checkpoint and a resume on the same layout."""
    exact = [*EXACT, "--global-batch", "8", "--data", str(data), "--ckpt-every", "2", "--fsdp", "--shard-ranks", "2"]
    out = tmp_path / "run"
    for steps, more in ((2, []), (4, ["--resume"])):
        done = _torchrun(4, *exact, "--out", str(out), "--max-steps", str(steps), *more)
        assert "FSDP: 2 replica(s) of the model, each sharded over 2 ranks" in done.stderr
    train(TrainConfig(data=str(data), out=str(tmp_path / "ref"), max_steps=4, global_batch=8, log_every=1,
                      precision="fp32", dropout=0.0, class_dropout=0.0, lr=1e-2))
    ours, ref = _losses(out / "metrics.jsonl"), _losses(tmp_path / "ref" / "metrics.jsonl")
    assert ours.keys() == ref.keys() == {1, 2, 3, 4}
    assert all(abs(ours[k] - ref[k]) < 1e-4 for k in ref)


def test_init_starts_from_released_or_exported_weights(tmp_path, data):
    import torch

    from jobs.export_gpt import ExportConfig, export

    common = dict(data=str(data), global_batch=8, log_every=1, precision="fp32", max_steps=1)
    train(TrainConfig(out=str(tmp_path / "a"), max_steps=2, **{k: v for k, v in common.items() if k != "max_steps"}))
    export(ExportConfig(checkpoint=str(tmp_path / "a"), out=str(tmp_path / "a.pt")))
    # A step at lr 0 leaves the weights as they started: the export's EMA (what from_pretrained picks).
    train(TrainConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a.pt"), lr=0.0, **common))
    export(ExportConfig(checkpoint=str(tmp_path / "b"), out=str(tmp_path / "b.pt")))
    start, after = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    assert all(torch.equal(after["model"][k], start["ema"][k]) for k in start["ema"])
    other = tmp_path / "other"
    make_token_dataset(other, shards=2, rows=8)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "codebook_size": 2048}))
    with pytest.raises(UsageError, match="vocabulary of 1024"):
        train(TrainConfig(out=str(tmp_path / "c"), init=str(tmp_path / "a.pt"), **{**common, "data": str(other)}))


def test_unlabelled_samples_are_a_one_line_error(tmp_path, capsys):
    from jobs.train_gpt import main

    make_token_dataset(tmp_path / "d", shards=2, rows=8, labelled=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--global-batch", "4", "--max-steps", "1",
              "--precision", "fp32", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "has label -1" in err and "needs a label" in err and "Traceback" not in err


@pytest.mark.parametrize("init, message", [
    ("missing.pt", "--init {tmp}/missing.pt does not exist"),
    ("other.pt", "GPT weights ({tmp}/other.pt) does not fit the model"),
    (None, "already holds checkpoints; pass --resume"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, init, message):
    import torch

    from jobs.train_gpt import main

    make_token_dataset(tmp_path / "d", shards=2, rows=8)
    torch.save({"model": {"unrelated.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    args = ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--global-batch", "4", "--max-steps", "1",
            "--precision", "fp32", "--cache-dir", str(tmp_path / "cache"), *(["--init", str(tmp_path / init)] if init else [])]
    if init is None:  # a run that checkpointed, started again without --resume
        main(args)
        capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message.format(tmp=tmp_path) in err[0]
