#!/usr/bin/env bash
# The cluster path on one machine: an S3 server (moto) and a Ray head on 127.0.0.1, the bundled
# photos put on S3, the tokenization job S3 -> S3 and GPT training on Ray Train from those shards,
# both through `ray job submit` exactly as on a cluster, then samples drawn from the checkpoint on
# S3. Everything it starts is stopped when it ends, failed or not.
#
#   infra/local-stack.sh [OUT]     (default OUT: out/local-stack; writes OUT/samples.png)
#
# On a cluster the same two `ray job submit` commands run against the head's address, with the
# bucket's real URL and credentials from the environment (see infra/kuberay and infra/cluster.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-out/local-stack}" && cd "${1:-out/local-stack}" && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TMP=$(mktemp -d /tmp/vfmtok-stack.XXXXXX)  # short: Ray's unix sockets must fit in 107 bytes
: >"$OUT/pids"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
    # Each service runs in its own process group; SIGKILL the groups (`ray stop` would end every
    # Ray process on the machine, and SIGTERM makes a Ray node drain for 30 s first).
    while read -r pid; do kill -9 -- "-$pid" 2>/dev/null || true; done <"$OUT/pids"
    rm -rf "$TMP"
}
trap cleanup EXIT

S3_PORT=$(free_port)
GCS_PORT=$(free_port)
DASH_PORT=$(free_port)
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT  # botocore (and so s3fs) reads the endpoint from here
export PATH=$VENV/bin:$PATH RAY_USAGE_STATS_ENABLED=0
# Bound to 127.0.0.1 only; a shared cluster keeps Ray's token authentication on.
export RAY_AUTH_MODE=disabled
unset RAY_ADDRESS
BUCKET=s3://vfmtok-local

echo "== S3 server on 127.0.0.1:$S3_PORT"
setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$TMP/s3.log" 2>&1 &
echo $! >>"$OUT/pids"
echo "== Ray head on 127.0.0.1 (dashboard :$DASH_PORT)"
setsid ray start --head --block --port="$GCS_PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASH_PORT" --num-cpus=4 --temp-dir="$TMP/ray" >"$TMP/ray.log" 2>&1 &
echo $! >>"$OUT/pids"

"$PY" - "$BUCKET" "$DASH_PORT" <<'EOF'
import sys, time, urllib.request

import fsspec

from pipelines.producer.samples import bundled_photos

bucket, dash = sys.argv[1], sys.argv[2]
deadline = time.time() + 120
for url in (None, f"http://127.0.0.1:{dash}/api/version"):
    while True:  # wait for the S3 server, then for the Ray head's job API
        try:
            if url is None:
                fs = fsspec.filesystem("s3")
                fs.mkdir(bucket)
            else:
                urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            if time.time() > deadline:
                raise SystemExit(f"service did not come up: {url or 'S3'}")
            time.sleep(0.5)
for i, (name, img) in enumerate(bundled_photos()):  # three class folders: the GPT is class-conditional
    with fs.open(f"{bucket}/photos/class{i % 3}/{name}.png", "wb") as f:
        img.save(f, format="PNG")
print(f"== put {len(fs.find(bucket + '/photos'))} photos in 3 class folders on {bucket}/photos")
EOF

submit() { ray job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir "$ROOT" -- "$@"; }

echo "== tokenize S3 -> S3 (ray job submit)"
submit python -m jobs.tokenize --input "$BUCKET/photos" --output "$BUCKET/tokens" --config tiny --variants center,flip
echo "== train GPT-tiny on Ray Train from the S3 shards (ray job submit)"
submit python -m jobs.train_gpt --data "$BUCKET/tokens" --out "$BUCKET/runs/gpt" --size GPT-tiny --global-batch 4 \
    --max-steps 10 --ckpt-every 10 --precision fp32 --checkpoint-format full --ray-workers 2
echo "== sample from the checkpoint on S3"
"$PY" -m jobs.sample --gpt "$BUCKET/runs/gpt/step-00000010.pt" --size GPT-tiny --config tiny --classes 0,1,2 \
    --per-class 2 --out "$OUT/samples.png"
echo "== done: $OUT/samples.png"
