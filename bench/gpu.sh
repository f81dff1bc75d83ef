#!/usr/bin/env bash
# Every GPU check of this project in one run, on a machine with one NVIDIA GPU, in under 8 minutes:
# the steps share one deadline, each runs under `timeout` capped by what is left of it, a failing
# step is recorded and the next one runs.
#
#   bench/gpu.sh [RESULTS_DIR]      run the checks (default results dir: out/gpu)
#   bench/gpu.sh --wheels [DIR]     on a machine with internet: fetch the wheels the GPU machine lacks
#
# Results (three files, so that they fit a device run's eight returned files):
#   summary.txt   one line per step: ok / FAILED (rc) / TIMEOUT / SKIPPED, seconds, its figures
#   results.json  every step's status and figures (each bench's JSON, parsed)
#   gpu.log       every step's full output
#
# Steps, most important first (a step that the deadline would cut is skipped, not started):
#   kernel_tests   tests/test_kernels_triton.py with every kernel call moved to CUDA (both backends
#                  on the GPU; the three tests that are about the CPU interpreter or CPU models are
#                  deselected and covered by triton_model)
#   kernel_bench   bench.kernels: Triton against the PyTorch references at VFMTok's shapes
#   triton_model   codes with Triton kernels against the PyTorch kernels, tiny and official config
#   encode         VFMTokenizer.encode images/s, official config (random weights), batch 64: fp32
#                  (IEEE), tf32 and bf16. bench/encode.py is not used: it times the CPU only.
#   bf16_agreement bench.bf16_agreement: the gate for bf16 by default
#   job_fp32/bf16  the Ray tokenization job, official config (random weights), folder of JPEGs ->
#                  Parquet, one actor on the GPU: images/s per GPU, and the GPU busy fraction from
#                  nvidia-smi sampled every 200 ms during the job command (mean over the whole command,
#                  Ray start and model build included, and over the span from first to last busy sample)
#   gpt_mfu        GPT-B forward+backward tokens/s at 256 tokens, bf16 autocast, batch 64, eager;
#                  MFU = 6 x parameters x tokens/s over 989 TFLOP/s (H200 dense bf16 peak): the 6N
#                  rule counts every parameter (embeddings too) and no attention-score FLOPs
#   sample_bench   bench.sample: KV-cache generation (CPU) and GPU images/s, eager and compiled
#   tok_train      jobs.train_tokenizer, official config (random weights, full-size LPIPS and
#                  discriminator, GAN terms on), bf16, global batch 16 on the one GPU: images/s and
#                  peak memory of the whole step (tokenizer, LPIPS, discriminator, both optimisers)
#   sample_npz     jobs.sample --num 2048 (the 50k protocol's job), GPT-B random weights, bf16, CFG 1.5,
#                  batch 256, official decoder at 336 -> 256: images/s and the minutes 50k would take
#   train_mfu      bench.train: the trainer itself (jobs.train_gpt), GPT-B and GPT-XL at 256 tokens,
#                  bf16, eager and --compile: step time, tokens/s, MFU (6 FLOPs per matmul weight
#                  plus attention, over the GPU's dense bf16 peak), peak memory
#
# Offline: the GPU machine reaches no registry, and its python3 is not this repo's .venv. The python
# used is the first with CUDA-enabled torch among $PYTHON, .venv/bin/python and python3 (the machine's
# image holds torch, triton, pytest, transformers, skimage, pyarrow). The repo runs from its folder
# through PYTHONPATH (Ray's workers inherit it), so no install of the repo is needed. What the image
# lacks for the Ray job (ray and jsonschema's chain) is installed, without index or dependencies,
# from the wheels in $VFMTOK_WHEELS (default .whl), which `--wheels` fetches for the GPU machine's
# python ($GPU_PYTHON_VERSION, default 3.12) at this repo's .venv versions. Ray's wheel is slimmed
# (its Java jars and dashboard web client go: neither runs here) so that it travels with the working
# tree within a device run's 64 MiB. Without them the job steps are skipped, and the rest runs.
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

fetch_wheels() {
    local dir=${1:-.whl} py=${PYTHON:-.venv/bin/python} specs
    mkdir -p "$dir" || return 1
    specs=$("$py" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")))') || return 1
    # shellcheck disable=SC2086  # one word per requirement
    "$py" -m pip download --no-deps --only-binary=:all: --implementation cp \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" $specs || return 1
    "$py" - "$dir" <<'EOF' || return 1
import glob, os, sys, zipfile

drop = ("ray/jars/", "ray/dashboard/client/build/")
for path in glob.glob(os.path.join(sys.argv[1], "ray-*.whl")):
    tmp = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if not line.startswith(tuple(d.encode() for d in drop)))
            dst.writestr(info, data)  # the ZipInfo keeps each entry's compression and permissions
    os.replace(tmp, path)
EOF
    if [ "$dir" = .whl ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo '/.whl/' >>.git/info/exclude  # carried on purpose (carry: [".whl"]), never committed
    fi
    du -sh "$dir"
}

if [ "${1:-}" = --wheels ]; then
    fetch_wheels "${2:-.whl}"
    exit
fi

RESULTS=${1:-out/gpu}
mkdir -p "$RESULTS" || exit 1
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d /tmp/vfmtok-gpu.XXXXXX) || exit 1
trap 'rm -rf "$WORK"' EXIT  # images, token shards and step outputs: what matters is copied to RESULTS
LOG=$RESULTS/gpu.log
STATUS=$WORK/status.tsv
: >"$LOG"
: >"$STATUS"
DEADLINE=$((SECONDS + 470))  # 8 minutes less 10 s for the summary
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=""
STEP_T=0

# run_step NAME CAP FUNCTION...: FUNCTION's stdout goes to $WORK/NAME.out (JSON where a bench prints
# it), stderr to $WORK/NAME.err; both are appended to gpu.log. FUNCTION runs its commands under
# `timeout $STEP_T`, the smaller of CAP and what the deadline leaves.
run_step() {
    local name=$1 cap=$2 left start rc status
    shift 2
    left=$((DEADLINE - SECONDS))
    STEP_T=$((cap < left ? cap : left))
    if [ "$STEP_T" -lt 20 ]; then
        printf '%s\tSKIPPED\t-\t0\tno time left before the 8-minute deadline\n' "$name" >>"$STATUS"
        return
    fi
    echo "== $name (timeout ${STEP_T}s)" | tee -a "$LOG"
    start=$SECONDS
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAILED ;;
    esac
    { cat "$WORK/$name.out" "$WORK/$name.err"; echo "== $name: $status (rc $rc, $((SECONDS - start)) s)"; } >>"$LOG"
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$((SECONDS - start))" >>"$STATUS"
    echo "   $status (rc $rc, $((SECONDS - start)) s)"
}

skip() {  # skip NAME REASON
    printf '%s\tSKIPPED\t-\t0\t%s\n' "$1" "$2" >>"$STATUS"
    echo "== $1: SKIPPED ($2)" | tee -a "$LOG"
}

py() { timeout -k 5 "$STEP_T" "$PY" "$@"; }

setup() {
    local cand site=$WORK/site
    for cand in "${PYTHON:-}" .venv/bin/python python3; do
        if [ -z "$cand" ] || ! command -v "$cand" >/dev/null; then continue; fi
        if timeout 60 "$cand" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            PY=$(command -v "$cand")
            break
        fi
    done
    if [ -z "$PY" ]; then
        echo "no python with CUDA-enabled torch among \$PYTHON, .venv/bin/python, python3" >&2
        return 1
    fi
    if ! "$PY" -c 'import ray, jsonschema' 2>/dev/null && compgen -G "${VFMTOK_WHEELS:-.whl}/*.whl" >/dev/null; then
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "${VFMTOK_WHEELS:-.whl}"/*.whl || return 1
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c 'import sys, torch, triton; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import ray; print("ray", ray.__version__)' || echo "ray: not importable; the job steps will be skipped"
}

kernel_tests() {
    cat >"$WORK/cuda_kernel_calls.py" <<'EOF'
"""pytest plugin: every kernels.ms_deform_attn / codebook_lookup call of the tests runs on CUDA
(inputs moved there, the output moved back; both moves are differentiable, so gradients too)."""
import torch

import kernels


def _on_cuda(fn):
    def call(*args, **kwargs):
        return fn(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), **kwargs).cpu()
    return call


kernels.ms_deform_attn = _on_cuda(kernels.ms_deform_attn)
kernels.codebook_lookup = _on_cuda(kernels.codebook_lookup)
EOF
    local t=tests/test_kernels_triton.py
    TRITON_INTERPRET=0 PYTHONPATH="$PYTHONPATH:$WORK" py -m pytest -q -p no:cacheprovider -p cuda_kernel_calls "$t" \
        --deselect "$t::test_tokenizer_codes_unchanged_with_triton_kernels" \
        --deselect "$t::test_golden_codes_with_triton_kernels" \
        --deselect "$t::test_triton_on_cpu_without_interpreter_says_how"
}

kernel_bench() {
    py -m bench.kernels >"$WORK/kernels_fp32.json" && py -m bench.kernels --dtype bfloat16 >"$WORK/kernels_bf16.json" || return
    "$PY" -c 'import json, sys; print(json.dumps({"float32": json.load(open(sys.argv[1])), "bfloat16": json.load(open(sys.argv[2]))}))' \
        "$WORK/kernels_fp32.json" "$WORK/kernels_bf16.json"
}

triton_model() {
    py - <<'EOF'
import json

import torch

from bench.bf16_agreement import golden_tokenizer
from pipelines.producer.precision import fp32_math
from tests.golden import load_npz
from vfmtok_core import VFMTokenizer
from vfmtok_core.preprocess import to_tensor

result = {"device": torch.cuda.get_device_name(), "precision": "fp32 (IEEE)"}
x = torch.rand(16, 3, 112, 112, generator=torch.Generator().manual_seed(0)).cuda() * 2 - 1
with fp32_math("fp32"):
    ref = VFMTokenizer.from_config("tiny", seed=0, backend="torch", device="cuda").encode(x)
    tri = VFMTokenizer.from_config("tiny", seed=0, backend="triton", device="cuda").encode(x)
    result["tiny_triton_equal_torch_share"] = (ref == tri).float().mean().item()
    tri_tok = golden_tokenizer("cuda")  # backend "auto": Triton on CUDA
    ref_tok = VFMTokenizer("vfmtok-l14-336", backend="torch")
    ref_tok.load_state_dict(tri_tok.state_dict())
    images = to_tensor(load_npz("inputs")["images_uint8"]).cuda()
    tri, ref = tri_tok.encode(images).cpu(), ref_tok.cuda().encode(images).cpu()
expected = torch.from_numpy(load_npz("expected_tokenizer")["codes"])
result["golden_triton_equal_torch_share"] = (ref == tri).float().mean().item()
result["golden_triton_equal_official_share"] = (tri == expected).float().mean().item()
result["golden_torch_equal_official_share"] = (ref == expected).float().mean().item()
print(json.dumps(result))
EOF
}

encode() {
    py - <<'EOF'
import json
import time

import torch

from pipelines.producer.precision import fp32_math, model_precision
from vfmtok_core import VFMTokenizer

tok = VFMTokenizer.from_config("vfmtok-l14-336", seed=0, device="cuda")
batch = 64
x = torch.rand(batch, 3, 336, 336, device="cuda") * 2 - 1
result = {"device": torch.cuda.get_device_name(), "config": "vfmtok-l14-336", "weights": "random", "batch": batch}
for precision, repeats in (("fp32", 4), ("tf32", 6), ("bf16", 10)):
    tok.precision = model_precision(precision)
    with fp32_math(precision):
        for _ in range(2):
            tok.encode(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            tok.encode(x)
        torch.cuda.synchronize()
    result[f"images_per_s_{precision}"] = round(batch * repeats / (time.perf_counter() - start), 1)
result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
print(json.dumps(result))
EOF
}

agreement() { py -m bench.bf16_agreement; }

make_images() {
    py -c 'import sys; from pathlib import Path; from bench.pipeline import write_jpegs; write_jpegs(Path(sys.argv[1]), int(sys.argv[2]))' \
        "$WORK/images" 3072 && find "$WORK/images" -name '*.jpg' | wc -l
}

job() {  # job PRECISION
    local util=$WORK/util_$1.csv smi rc
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$util" 2>/dev/null &
    smi=$!
    py -m jobs.tokenize --input "$WORK/images" --output "$WORK/tokens_$1" --config vfmtok-l14-336 \
        --precision "$1" --batch-size 64 --rows-per-shard 256 >"$WORK/job_$1.json"
    rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    [ "$rc" -eq 0 ] || return "$rc"
    "$PY" - "$WORK/job_$1.json" "$util" "$1" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
samples = [float(s) for s in open(sys.argv[2]).read().split() if s.replace(".", "", 1).isdigit()]
busy = [i for i, s in enumerate(samples) if s > 0]
active = samples[busy[0] : busy[-1] + 1] if busy else []
this = summary["this_run"]
print(json.dumps({
    "precision": sys.argv[3],
    "images": this["images"],
    "seconds": this["seconds"],
    "images_per_s_per_gpu": this["images_per_s"],  # one actor on the one GPU
    "gpu_busy_mean_whole_command": round(sum(samples) / len(samples) / 100, 3) if samples else None,
    "gpu_busy_mean_first_to_last_busy": round(sum(active) / len(active) / 100, 3) if active else None,
    "util_samples": len(samples),
    "complete": summary["complete"],
}))
EOF
}

gpt_mfu() {
    py - <<'EOF'
import json
import time

import torch
import torch.nn.functional as F

from vfmtok_core.gpt import GPT

model = GPT.from_config("GPT-B", seed=0).cuda().train()
params = sum(p.numel() for p in model.parameters())
batch, tokens = 64, 256
g = torch.Generator(device="cuda").manual_seed(0)
labels = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
codes = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda", generator=g)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(labels, codes)
    F.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
    model.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
steps, start = 20, time.perf_counter()
for _ in range(steps):
    step()
torch.cuda.synchronize()
tokens_per_s = batch * tokens * steps / (time.perf_counter() - start)
print(json.dumps({
    "model": "GPT-B", "params": params, "batch": batch, "tokens_per_sample": tokens,
    "what": "forward+backward, bf16 autocast, eager, no optimizer step",
    "tokens_per_s": round(tokens_per_s),
    "model_tflop_per_s_6N": round(6 * params * tokens_per_s / 1e12, 1),
    "mfu_vs_989_tflops": round(6 * params * tokens_per_s / 989e12, 4),
}))
EOF
}

sample_bench() { py -m bench.sample --batch-size 1; }
train_mfu() { py -m bench.train --sizes GPT-B GPT-XL --steps 6 --warmup 3 --no-checkpoints; }

sample_npz() {  # jobs.sample --num: GPT-B (random weights) in bf16 with CFG 1.5, official decoder, one process
    py -m jobs.sample --size GPT-B --config vfmtok-l14-336 --num 2048 --batch-size 256 --precision bf16 \
        --cfg-scale 1.5 --out "$WORK/samples.npz" 2>"$WORK/sample_npz.log" || { tail -n 20 "$WORK/sample_npz.log" >&2; return 1; }
    grep -o '[0-9]* images sampled in [0-9.]*s ([0-9.]* images/s)' "$WORK/sample_npz.log" | tail -n 1 |
        awk '{r = substr($6, 2); printf "{\"images\": %s, \"seconds\": %s, \"images_per_s\": %s, \"minutes_for_50k\": %.1f}\n", $1, substr($5, 1, length($5) - 1), r, 50000 / r / 60}'
}

tok_train() {  # the tokenizer trainer's metrics over steps 9-16 (after 8 warm-up steps)
    py -c 'import sys; from pathlib import Path; from bench.pipeline import write_jpegs; write_jpegs(Path(sys.argv[1]), 64)' \
        "$WORK/tok_images" >/dev/null || return 1
    py -m jobs.train_tokenizer --data "$WORK/tok_images" --out "$WORK/tok_run" --config vfmtok-l14-336 --precision bf16 \
        --global-batch 16 --epochs 1000 --max-steps 16 --log-every 8 --disc-start 0 --image-every 0 --ckpt-every 1000 \
        >/dev/null || return 1
    tail -n 1 "$WORK/tok_run/metrics.jsonl"
}

run_step setup 90 setup
if [ -n "$PY" ]; then
    run_step kernel_tests 120 kernel_tests
    run_step kernel_bench 60 kernel_bench
    run_step triton_model 90 triton_model
    run_step encode 60 encode
    run_step bf16_agreement 90 agreement
    if "$PY" -c 'import ray' 2>/dev/null; then
        run_step job_images 45 make_images
        run_step job_fp32 100 job fp32
        run_step job_bf16 75 job bf16
    else
        skip job "ray is not importable: fetch its wheels with bench/gpu.sh --wheels and carry .whl"
    fi
    run_step gpt_mfu 45 gpt_mfu
    run_step tok_train 90 tok_train
    run_step sample_npz 120 sample_npz
    run_step sample_bench 90 sample_bench
    run_step train_mfu 150 train_mfu
fi

"${PY:-python3}" - "$STATUS" "$WORK" "$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

status, work, results = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])


def figures(value, prefix=""):
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in figures(v, f"{prefix}{k}.")]
    return [f"{prefix[:-1]}={value:.4g}"] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


steps, lines = {}, []
for row in status.read_text().splitlines():
    name, state, rc, seconds, reason = row.split("\t")
    entry = {"status": state, "rc": rc, "seconds": int(seconds)}
    if reason:
        entry["reason"] = reason
    out = work / f"{name}.out"
    text = out.read_text() if out.exists() else ""
    try:
        entry["result"] = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    except ValueError:
        tail = (text + (work / f"{name}.err").read_text() if (work / f"{name}.err").exists() else text).strip()
        entry["tail"] = tail.splitlines()[-15:]
    steps[name] = entry
    shown = " ".join(figures(entry.get("result", {}))) or reason or (entry.get("tail") or [""])[-1]
    lines.append(f"{name:15s} {state:8s} {seconds:>4s}s  {shown}")
(results / "results.json").write_text(json.dumps(steps, indent=1))
(results / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "total ${SECONDS}s; results in $RESULTS"
