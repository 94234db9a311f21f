"""The DeepSpeed trainer as a real process on a real Redis: exactly-once training across a
crash and `--resume` (also when the rollout servers already serve a newer version),
accounting, and groups it cannot use dead-lettered while it trains the others (several
ranks: test_trainer_ranks.py)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common.protocol import RolloutGroup
from services.queue.keys import SCORED, RunKeys
from services.queue.queues import GroupQueue, QueueReader
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import (
    RUN,
    rollout_server,
    served_version,
    trained_log,
    trainer_process,
    write_config,
)
from tests.process_support import wait_for
from trainer.checkpoint import LATEST

pytestmark = pytest.mark.slow


def test_crash_and_resume_train_every_group_exactly_once(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(0)
    queue.claim_prompts(8)  # the positions of the prompt stream these groups came from

    def publish(i: int) -> None:
        group = scored_group(i, rng)
        group.prompt_index = i
        queue.publish(SCORED, group, counter="scored")

    # Three steps' worth: steps 1-2 are checkpointed, step 3 is trained but not
    # checkpointed when the trainer blocks waiting for a fourth batch and is killed.
    for i in range(6):
        publish(i)
    config = write_config(tmp_path, tiny_student)
    first = trainer_process(config, redis_url, tmp_path)
    wait_for(lambda: len(trained_log(tmp_path)) >= 3, 180, first)
    time.sleep(0.5)
    first.kill()
    before = trained_log(tmp_path)
    assert [row["step"] for row in before] == [1, 2, 3]
    assert queue.stats().get("trained") == 4  # only the checkpointed steps are acknowledged
    lost_in_crash = set(before[2]["groups"])  # type: ignore[arg-type]
    # The checkpoint of step 2 holds where the prompt stream resumes: groups 0-3 are in it,
    # 4 and 5 were still queued.
    saved = json.loads((tmp_path / "trainer-test" / "checkpoints" / LATEST).read_text())
    assert saved["prompt_cursor"] == 4

    for i in range(6, 8):
        publish(i)
    fresh_redis.delete(RunKeys(RUN).prompt_cursor)  # as a Redis that lost it would
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
    assert int(fresh_redis.get(RunKeys(RUN).prompt_cursor)) == 4  # continued, not restarted
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


def with_completion(group: RolloutGroup, name: str, **change: Any) -> RolloutGroup:
    """`group` renamed, its first completion changed as given, unchecked: as a producer
    that does not use the schema could write it."""
    first = group.completions[0].model_copy(update=change)
    completions = [first, *group.completions[1:]]
    return group.model_copy(update={"group_id": name, "completions": completions})


def test_unusable_groups_are_dead_lettered_and_the_others_trained(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(2)
    long_ids = [rng.randrange(2, 90) for _ in range(97)]
    nan_group, small_group = scored_group(92, rng), scored_group(95, rng)
    nan_row = [math.nan] * len(nan_group.completions[0].token_ids)
    malformed = [  # refused by the schema when the trainer reads them
        with_completion(scored_group(90, rng), "two-logprobs-for-97-tokens", token_ids=long_ids,
                        rollout_logprobs=[-1.0, -1.0], teacher_logprobs=[-2.0] * 97),
        with_completion(scored_group(91, rng), "one-logprob-broadcast", rollout_logprobs=[-1.0]),
        with_completion(nan_group, "nan-teacher-logprob", teacher_logprobs=nan_row),
    ]  # fmt: skip
    unusable = [  # well-formed, but not for this run
        with_completion(scored_group(93, rng), "unscored", teacher_logprobs=None),
        with_completion(scored_group(94, rng), "outside-vocabulary", token_ids=[5, 100_000],
                        rollout_logprobs=[-1.0, -1.0], teacher_logprobs=[-1.0, -1.0]),
        small_group.model_copy(
            update={"group_id": "three-completions", "completions": small_group.completions[:3]}
        ),
    ]  # fmt: skip
    for i, bad in enumerate(malformed + unusable):
        queue.publish(SCORED, bad, counter="scored")
        queue.publish(SCORED, scored_group(i, rng), counter="scored")
    config = write_config(tmp_path, tiny_student, steps=3, checkpoint_every=3)
    proc = trainer_process(config, redis_url, tmp_path)
    assert proc.wait(timeout_s=300) == 0, proc.tail()

    trained = [g for row in trained_log(tmp_path) for g in row["groups"]]  # type: ignore[attr-defined]
    assert sorted(trained) == sorted(f"group-{i}" for i in range(6))
    stats = queue.stats()
    assert stats["trained"] == 6 and stats["dead"] == 6 and stats["scored"] == 12
    reasons = [letter.reason for letter in QueueReader(fresh_redis, RUN).recent_dead(20)]
    assert len(reasons) == 6
    expected = [
        "payload could not be decoded: completions.0: Value error, rollout_logprobs has 2 "
        "values for 97 completion tokens",
        "payload could not be decoded: completions.0: Value error, rollout_logprobs has 1 ",
        "payload could not be decoded: completions.0.teacher_logprobs.0: Input should be a "
        "finite number",
        "3 completions, where the trainer's config has rollout.group_size 4",
        "completions [0] have no teacher_logprobs, which algorithm trrd needs",
        "token id 100000 is outside the student's vocabulary",
    ]
    for start in expected:
        assert sum(reason.startswith(start) for reason in reasons) == 1, (start, reasons)


def test_resume_retrains_the_lost_groups_though_the_servers_serve_a_newer_version(
    tmp_path: Path, tiny_student: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    """Steps 1-3 train at versions 0, 1 and 2 on groups of those versions and push 1, 2 and
    3; the checkpoint after step 2 holds version 2. Killed after step 3, the trainer resumes
    with the server at 3 and pushes 4; step 3's groups are 2 versions behind 4 but were
    trained once within `max_staleness` 1, and must be trained again, not dropped."""
    server, url = rollout_server(tiny_student, tmp_path)
    try:
        queue = GroupQueue(fresh_redis, RUN)
        rng = random.Random(3)
        for i in range(6):
            group = scored_group(i, rng).model_copy(update={"policy_version": i // 2})
            queue.publish(SCORED, group, counter="scored")
        config = write_config(tmp_path, tiny_student, max_staleness=1)
        flags = ("--rollout-url", url)
        first = trainer_process(config, redis_url, tmp_path, *flags)
        wait_for(lambda: served_version(url) == 3, 240, first)
        first.kill()
        before = trained_log(tmp_path)
        assert [(row["step"], row["policy_version"]) for row in before] == [(1, 0), (2, 1), (3, 2)]
        assert queue.stats().get("trained") == 4  # steps 1-2, checkpointed

        for i in range(6, 8):
            group = scored_group(i, rng).model_copy(update={"policy_version": 4})
            queue.publish(SCORED, group, counter="scored")
        second = trainer_process(config, redis_url, tmp_path, *flags, "--resume")
        assert second.wait(timeout_s=300) == 0, second.tail()
        after = trained_log(tmp_path)[3:]
        assert [(row["step"], sorted(row["groups"])) for row in after] == [  # type: ignore[call-overload]
            (3, ["group-4", "group-5"]),
            (4, ["group-6", "group-7"]),
        ]
        stats = queue.stats()
        assert stats.get("stale", 0) == 0 and stats["trained"] == 8
        assert served_version(url) == 6
    finally:
        server.stop()
