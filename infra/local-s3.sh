#!/usr/bin/env bash
# Start an S3-compatible server (moto's server mode) on 127.0.0.1 for trying s3:// paths locally.
# Usage: infra/local-s3.sh [PORT]   -- prints the environment to export, runs in the foreground.
# The test suite starts its own server per session (tests/conftest.py) and does not need this.
set -euo pipefail
port=${1:-9000}
venv=${VENV:-$(dirname "$0")/../.venv}
cat <<MSG
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:${port}
# storage options for fsspec/s3fs: {"client_kwargs": {"endpoint_url": "http://127.0.0.1:${port}"}}
MSG
exec "$venv/bin/moto_server" -H 127.0.0.1 -p "$port"
