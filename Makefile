# `make run`: set up and run the whole pipeline on CPU with tiny models.
# `make test`: set up and run lint, type checks and the full test suite.
VENV ?= .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: setup run test lint typecheck unit bench compare

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

test: lint typecheck
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/teacher_scoring.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/pipeline.py

# GRPO vs KDRL vs RLAD through the real pipeline (about an hour on 2 CPU cores).
compare: setup
	$(BIN)/rlad bootstrap --out artifacts/tiny
	$(BIN)/python bench/compare.py
