#!/usr/bin/env bash
# Create .venv and install edgelmm: `scripts/setup.sh` for the package alone (what the demo
# needs), `scripts/setup.sh dev` with the test tools and the engines the tests run.
#
# PyTorch: a torch that Python can already import (a CUDA build on a GPU machine, say) is kept,
# since the venv sees system packages; otherwise a machine with an NVIDIA driver gets the
# default (CUDA) build and a CPU-only machine gets the CPU build, never the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
EXTRAS=${1:-}
target=$([ -n "$EXTRAS" ] && echo ".[$EXTRAS]" || echo ".")
stamp="$VENV/.edgelmm-installed-${EXTRAS:-base}"
want=$( (cat pyproject.toml scripts/setup.sh; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if python -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  pip install -q torch
else
  echo "setup: no NVIDIA GPU, installing the CPU build torch==$TORCH_CPU_VERSION"
  extra=()
  if python - <<'PY' 2>/dev/null; then extra=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
import urllib.request
urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=3)
PY
  pip install -q "torch==$TORCH_CPU_VERSION" "${extra[@]}"
fi
if [ "$EXTRAS" = dev ]; then
  echo "setup: installing edgelmm[dev] (the first time, llama-cpp-python compiles from source: about 10 min on 2 cores)"
fi
pip install -q -e "$target"
echo "$want" > "$stamp"
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
