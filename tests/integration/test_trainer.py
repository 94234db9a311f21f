"""The DeepSpeed trainer as a real process on a real Redis: exactly-once training across a
crash and `--resume`, and accounting (several ranks: test_trainer_ranks.py)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import redis

from services.queue.keys import SCORED
from services.queue.queues import GroupQueue
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import RUN, trained_log, trainer_process, write_config
from tests.process_support import wait_for

pytestmark = pytest.mark.slow


def test_crash_and_resume_train_every_group_exactly_once(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(0)
    # Three steps' worth: steps 1-2 are checkpointed, step 3 is trained but not
    # checkpointed when the trainer blocks waiting for a fourth batch and is killed.
    for i in range(6):
        queue.publish(SCORED, scored_group(i, rng), counter="scored")
    config = write_config(tmp_path, tiny_student)
    first = trainer_process(config, redis_url, tmp_path)
    wait_for(lambda: len(trained_log(tmp_path)) >= 3, 180, first)
    time.sleep(0.5)
    first.kill()
    before = trained_log(tmp_path)
    assert [row["step"] for row in before] == [1, 2, 3]
    assert queue.stats().get("trained") == 4  # only the checkpointed steps are acknowledged
    lost_in_crash = set(before[2]["groups"])  # type: ignore[arg-type]

    for i in range(6, 8):
        queue.publish(SCORED, scored_group(i, rng), counter="scored")
    second = trainer_process(config, redis_url, tmp_path, "--resume")
    assert second.wait(timeout_s=300) == 0, second.tail()
    after = trained_log(tmp_path)[3:]
    assert [row["step"] for row in after] == [3, 4]
    durable = [g for row in before[:2] + after for g in row["groups"]]  # type: ignore[attr-defined]
    assert sorted(durable) == sorted(f"group-{i}" for i in range(8)), "each group exactly once"
    assert lost_in_crash <= set(after[0]["groups"])  # type: ignore[arg-type]
    stats = queue.stats()
    assert stats["trained"] == 8 and stats["scored"] == 8
    assert queue.pending_for(SCORED, "trainer-0") == []
    metrics = (tmp_path / "trainer-test" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4
    assert (tmp_path / "trainer-test" / "final" / "model.safetensors").exists()


def test_stale_groups_are_dropped_and_counted(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(1)
    # The trainer starts at version 0; a group claiming version -3 is 3 versions behind.
    stale = scored_group(99, rng).model_copy(update={"policy_version": -3})
    queue.publish(SCORED, stale, counter="scored")
    for i in range(2):
        queue.publish(SCORED, scored_group(i, rng), counter="scored")
    config = write_config(tmp_path, tiny_student, steps=1, max_staleness=2)
    proc = trainer_process(config, redis_url, tmp_path)
    assert proc.wait(timeout_s=300) == 0, proc.tail()
    stats = queue.stats()
    assert stats["stale"] == 1 and stats["trained"] == 2
    assert stats["scored"] == stats["trained"] + stats["stale"]
