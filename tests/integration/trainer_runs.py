"""Helpers for tests that run `rlad train` as real processes: the run config, the audit
of which groups each step trained on, the trainer under one or several ranks, and a
transformers rollout server of the student to push to."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import yaml

from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.launch.up import RLAD

RUN = "trainer-test"


def write_config(folder: Path, student: Path, **trainer: object) -> Path:
    config = {
        "name": RUN,
        "run_dir": str(folder),
        "student": str(student),
        "teacher": str(student),
        "task": {"name": "kk", "people": [2], "rendering": "compact"},
        "algorithm": {"name": "trrd", "alpha": 0.5},
        # Four completions per prompt, as in `tests.integration.groups.scored_group`; a
        # rollout worker, where a test runs one, asks one prompt at a time, briefly.
        "rollout": {"group_size": 4, "prompts_per_request": 1, "max_tokens": 8},
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


def rollout_server(
    student: Path, folder: Path, port: int | None = None
) -> tuple[ManagedProcess, str]:
    """A transformers rollout server of `student` (versions from 0), healthy, and its URL."""
    port = port or free_port()
    argv = [*RLAD, "serve-rollout", "--model", str(student), "--backend", "hf"]
    log = folder / f"rollout-{port}.log"
    server = ManagedProcess("rollout", [*argv, "--port", str(port)], log).start()
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(f"{url}/health", timeout_s=240)
    except BaseException:
        server.stop()
        raise
    return server, url


def served_version(url: str) -> int:
    return int(httpx.get(f"{url}/v1/info").json()["policy_version"])


def push_student(url: str, student: Path, version: int) -> None:
    """Push `student`'s own weights to the server at `url` as `version`, as a trainer does."""
    from transformers import AutoModelForCausalLM

    from services.clients.rollout import RolloutClient

    state = AutoModelForCausalLM.from_pretrained(student).state_dict()

    async def push() -> None:
        async with RolloutClient(url) as client:
            await client.push_weights(state, version)

    asyncio.run(push())
