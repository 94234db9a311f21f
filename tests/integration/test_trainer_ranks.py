"""Two trainer ranks under torchrun (gloo on the CPU) pushing to a real rollout server:
every rank trains at the one version rank 0 decided, the Redis state and the server agree
with it (ZeRO-2), and at ZeRO-3 the probe and the gathers do not hang and a crash between
a checkpoint and its acknowledgements is resumed with every group trained exactly once
across both ranks, again at one version per step."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.queue.keys import SCORED
from services.queue.queues import GroupQueue, QueueReader
from tests.integration.crash_before_ack import CRASH_EXIT_CODE
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import (
    RUN,
    rollout_server,
    served_version,
    trained_log,
    trainer_process,
    write_config,
)

pytestmark = pytest.mark.slow
RANKS = 2
# Groups are published at version 0 and the server's version rises with every push.
NEVER_STALE = {"max_staleness": 1000}


@pytest.fixture
def rollout_url(tmp_path: Path, tiny_student: Path) -> Iterator[str]:
    """A transformers rollout server of the student, fresh for each test (versions from 0)."""
    server, url = rollout_server(tiny_student, tmp_path)
    try:
        yield url
    finally:
        server.stop()


def versions_by_step(rows: list[dict[str, object]]) -> dict[object, set[object]]:
    by_step: dict[object, set[object]] = {}
    for row in rows:
        by_step.setdefault(row["step"], set()).add(row["policy_version"])
    return by_step


def publish(queue: GroupQueue, indices: range, seed: int) -> None:
    rng = random.Random(seed)
    for i in indices:
        queue.publish(SCORED, scored_group(i, rng), counter="scored")


def test_every_rank_trains_at_rank_0s_version(
    tmp_path: Path,
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
    rollout_url: str,
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    publish(queue, range(8), seed=2)
    config = write_config(
        tmp_path, tiny_student, steps=2, batch_prompts=4, zero_stage=2, **NEVER_STALE
    )
    trainer = trainer_process(
        config, redis_url, tmp_path, "--rollout-url", rollout_url, ranks=RANKS
    )
    assert trainer.wait(timeout_s=420) == 0, trainer.tail(60)
    rows = trained_log(tmp_path)
    assert sorted((r["step"], r["rank"]) for r in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert versions_by_step(rows) == {1: {0}, 2: {1}}  # both ranks, the same version
    groups = [g for r in rows for g in r["groups"]]  # type: ignore[attr-defined]
    assert sorted(groups) == sorted(f"group-{i}" for i in range(8))
    assert queue.stats()["trained"] == 8
    # One push per step, verified by the server; the Redis state says the same version.
    assert served_version(rollout_url) == 2
    assert QueueReader(fresh_redis, RUN).trainer_progress().policy_version == 2


def test_a_crash_between_checkpoint_and_acks_trains_every_group_once(
    tmp_path: Path,
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
    rollout_url: str,
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    publish(queue, range(4), seed=3)
    # Steps 1-2 take one group per rank each; the checkpoint after step 2 reaches the disk,
    # then both ranks die before acknowledging any group.
    config = write_config(tmp_path, tiny_student, zero_stage=3, **NEVER_STALE)
    flags = ("--rollout-url", rollout_url)
    crash = "tests.integration.crash_before_ack"
    crashing = trainer_process(config, redis_url, tmp_path, *flags, ranks=RANKS, module=crash)
    # A probe forward on rank 0 alone would wait for the other rank's gathers forever.
    assert crashing.wait(timeout_s=420) != 0, crashing.tail(60)
    assert re.search(rf"exitcode\s*:\s*{CRASH_EXIT_CODE}\b", crashing.tail(200))
    saved = json.loads((tmp_path / RUN / "checkpoints" / "latest_progress.json").read_text())
    assert saved["step"] == 2
    before = [r for r in trained_log(tmp_path) if r["step"] <= saved["step"]]  # type: ignore[operator]
    assert versions_by_step(before) == {1: {0}, 2: {1}}
    assert sorted(saved["consumed"]) == sorted(
        queue.pending_for(SCORED, "trainer-0") + queue.pending_for(SCORED, "trainer-1")
    ), "the checkpoint lists the groups of both ranks, none acknowledged yet"

    publish(queue, range(4, 8), seed=4)
    resumed = trainer_process(config, redis_url, tmp_path, *flags, "--resume", ranks=RANKS)
    assert resumed.wait(timeout_s=420) == 0, resumed.tail(60)
    after = [r for r in trained_log(tmp_path) if r["step"] > saved["step"]]  # type: ignore[operator]
    assert sorted((r["step"], r["rank"]) for r in after) == [(3, 0), (3, 1), (4, 0), (4, 1)]
    durable = [g for r in before + after for g in r["groups"]]  # type: ignore[attr-defined]
    assert sorted(durable) == sorted(f"group-{i}" for i in range(8)), "each group exactly once"
    assert queue.stats()["trained"] == 8
    assert queue.pending_for(SCORED, "trainer-0") == queue.pending_for(SCORED, "trainer-1") == []
    # The resumed ranks start from the version the server serves (2) and push 3 first.
    assert versions_by_step(after) == {3: {3}, 4: {4}}
    assert served_version(rollout_url) == 5
    assert QueueReader(fresh_redis, RUN).trainer_progress().policy_version == 5
