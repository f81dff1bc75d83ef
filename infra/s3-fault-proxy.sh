#!/usr/bin/env bash
# Fault-injecting S3 proxy in front of a local S3 server (e.g. infra/local-s3.sh); see --help.
# Usage: infra/s3-fault-proxy.sh --upstream http://127.0.0.1:9000 --port 9100 --slowdown 0.05
set -euo pipefail
exec "${VENV:-$(dirname "$0")/../.venv}/bin/python" "$(dirname "$0")/s3_fault_proxy.py" "$@"
