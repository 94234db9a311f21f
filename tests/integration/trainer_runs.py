"""Helpers for tests that run `rlad train` as real processes: the run config, the audit
of which groups each step trained on, and the trainer under one or several ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from services.common.runtime import free_port
from services.launch.processes import ManagedProcess

RUN = "trainer-test"


def write_config(folder: Path, student: Path, **trainer: object) -> Path:
    config = {
        "name": RUN,
        "run_dir": str(folder),
        "student": str(student),
        "teacher": str(student),
        "task": {"name": "kk"},
        "algorithm": {"name": "trrd", "alpha": 0.5},
        "trainer": {"steps": 4, "batch_prompts": 2, "checkpoint_every": 2, "lr": 1e-4, **trainer},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trained_log(folder: Path) -> list[dict[str, object]]:
    """The rows of `trained_groups.jsonl`: step, rank, policy_version, groups."""
    path = folder / RUN / "trained_groups.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def trainer_process(
    config: Path,
    redis_url: str,
    folder: Path,
    *extra: str,
    ranks: int = 1,
    module: str = "services.cli.main",
) -> ManagedProcess:
    """`rlad train` on `config` (`module`: a stand-in for the CLI's entry point), alone or
    under `torchrun` with `ranks` processes (gloo on the CPU)."""
    python = [sys.executable]
    if ranks > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        python = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    argv = [*python, "-m", module, "train", "--config", str(config), "--redis-url", redis_url]
    return ManagedProcess(
        "trainer", [*argv, *extra], folder / "trainer.log", env={"DS_ACCELERATOR": "cpu"}
    ).start()
