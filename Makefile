# `make run`: set up and run the whole pipeline on CPU with tiny models.
# `make test`: set up and run lint, type checks, the full test suite and the compose smoke run.
VENV ?= .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: setup run test lint typecheck unit bench compare gpu-smoke gpu-wheels compose-smoke docker-tools

setup:
	bash scripts/setup.sh

run: setup
	$(BIN)/rlad bootstrap --out artifacts/tiny
	$(BIN)/rlad up --config configs/tiny-cpu.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit -q

# The Docker tools come first (apt, as root, where missing), so that the compose tests
# validate docker-compose.yml with a real compose; the smoke run of the compose stack last.
test: docker-tools lint typecheck
	$(BIN)/pytest -q
	bash scripts/compose_smoke.sh

docker-tools:
	bash scripts/docker_tools.sh

bench: setup
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/teacher_scoring.py
	$(BIN)/python bench/teacher_vs_vllm_serve.py
	$(BIN)/python bench/topk_bytes.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/cluster.py

# GRPO vs KDRL vs RLAD through the real pipeline (about an hour on 2 CPU cores).
compare: setup
	$(BIN)/rlad bootstrap --out artifacts/tiny
	$(BIN)/python bench/compare.py

# The CPU stack of docker-compose.yml built, run and checked end to end with docker compose
# (docs/operations.md#the-compose-smoke-run); needs a Docker engine, or root to start one.
compose-smoke:
	bash scripts/compose_smoke.sh

# On a machine with CUDA GPUs: the whole pipeline on the GPU for 20 steps, checked, then its
# figures (scripts/gpu_smoke.sh; no setup: it installs what is missing from .gpu-wheels/).
gpu-smoke:
	bash scripts/gpu_smoke.sh

# The wheels gpu-smoke installs on a GPU machine without network, downloaded here.
gpu-wheels: setup
	bash scripts/gpu_wheels.sh
