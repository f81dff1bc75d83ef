#!/usr/bin/env bash
# Create the project's virtualenv from pyproject.toml (first run only; `make` reruns it when
# pyproject.toml changes). Usage: tools/bootstrap.sh VENV [EXTRAS]
#
# On a machine without an NVIDIA GPU we install PyTorch's CPU build first: the default PyPI
# wheel for Linux is the CUDA build, several GB that a CPU machine cannot use. Set
# VFMTOK_TORCH to override the torch requirement (e.g. "torch==2.14.1" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-test}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${VFMTOK_TORCH:-}" ]; then
    "${pip[@]}" "$VFMTOK_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.4"
  else
    # A local wheel or mirror first; PyTorch's CPU index where there is none.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
if [[ ",${extras}," == *",test,"* ]]; then
  # The tests check our LPIPS against the `lpips` package. Its torchvision dependency is left out:
  # the index's torchvision is a CUDA build that cannot import beside the CPU torch (its ops need
  # libtorch_cuda), and the tests give lpips the plain VGG16 layer stack it asks torchvision for.
  "${pip[@]}" --no-deps "lpips==0.1.4"
  # The same for torch-fidelity, the reference our Inception port is checked against. Its wheel also
  # installs a top-level `tests` package (its own suite); ours has an __init__.py so that it wins,
  # and the stray one is removed all the same.
  "${pip[@]}" --no-deps "torch-fidelity==0.4.0"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -d "$site/tests/torch_pure" ]; then rm -rf "$site/tests"; fi
fi
"$venv/bin/python" -c "import vfmtok_core, kernels, pipelines, jobs" # fail loudly if the install did not take
