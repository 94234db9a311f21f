"""Two real `rlad rollout-worker` processes split the run's one seeded prompt stream through
the shared prompt cursor, against a real rollout server (HF backend, tiny student) that
they find through the registry, on a real Redis: every position is generated once, none is
skipped, and the prompts are the seeded order's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import redis
import yaml

from services.common import wire
from services.common.protocol import RolloutGroup
from services.config.run import load_run_config
from services.launch.processes import ManagedProcess
from services.queue.keys import ROLLOUTS, RunKeys
from services.queue.registry import ServerRegistry
from services.tasks import load_task
from tests.integration.test_rollout_servers import start_server
from tests.process_support import wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "services.cli.main"]
RUN = "cursor"
GROUPS_EACH = 8


def rollout_groups(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[RolloutGroup]:
    """The groups of `rollouts` stream entries, as XRANGE or XREAD return them."""
    return [wire.decode(fields[b"data"], RolloutGroup) for _, fields in entries]


def prompt_positions(groups: list[RolloutGroup]) -> list[int]:
    """The prompt-stream positions the groups were generated at, sorted: a position that
    appears twice was generated twice."""
    return sorted(g.prompt_index for g in groups if g.prompt_index is not None)


def test_two_workers_split_the_prompt_stream(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    config = tmp_path / "run.yaml"
    spec = {
        "name": RUN,
        "student": str(tiny_student),
        "task": {"name": "kk", "people": [2], "rendering": "compact"},  # fits the tiny model
        "scorer": {"mode": "passthrough"},
        "algorithm": {"name": "grpo"},
        "rollout": {"group_size": 2, "prompts_per_request": 2, "max_tokens": 8, "seed": 3},
    }
    config.write_text(yaml.safe_dump(spec))
    flags = ["--register", redis_url, "--run", RUN]
    server, url = start_server(tmp_path, tiny_student, "hf", "127.0.0.1", {}, *flags)
    workers = []
    try:
        registry = ServerRegistry(fresh_redis, RUN)
        wait_for(lambda: [r.url for r in registry.servers("rollout")] == [url], 10, server)
        for name in ("worker-a", "worker-b"):
            argv = [*CLI, "rollout-worker", "--config", str(config), "--rollout-url", "registry"]
            argv += ["--redis-url", redis_url, "--max-groups", str(GROUPS_EACH)]
            workers.append(ManagedProcess(name, argv, tmp_path / f"{name}.log").start())
        for worker in workers:
            assert worker.wait(timeout_s=240) == 0, worker.tail()
    finally:
        for worker in workers:
            worker.stop()
        server.stop()

    # Both took part: each stopped after its own groups.
    for worker in workers:
        made = re.search(r"stopping after (\d+)\s+groups", worker.log_path.read_text())
        assert made and int(made.group(1)) >= GROUPS_EACH, worker.tail()
    keys = RunKeys(RUN)
    groups = rollout_groups(fresh_redis.xrange(keys.stream(ROLLOUTS)))
    cursor = int(fresh_redis.get(keys.prompt_cursor) or 0)
    assert prompt_positions(groups) == list(range(cursor)), "a position twice, or one skipped"
    assert cursor >= 2 * GROUPS_EACH
    run = load_run_config(config)
    order = load_task(run.task).problems("train", seed=run.rollout.seed)
    expected = [next(order).prompt_id for _ in range(cursor)]
    by_position = {g.prompt_index: g.prompt_id for g in groups}
    assert [by_position[i] for i in range(cursor)] == expected
