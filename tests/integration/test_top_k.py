"""The teacher's top-k end to end: a real HF teacher server, a real Redis, the scorer with
`scorer.top_k: 4` → the scored groups carry, packed, exactly what `TeacherClient.score(...,
top_k=4)` answers; a KDRL `topk` trainer step consumes them, and dead-letters a scored
group without top-k with the reason."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from services.clients.teacher import TeacherClient
from services.common.protocol import RolloutGroup, ScoreSequence
from services.common.wire import decode
from services.config.run import RunConfig
from services.config.servers import TeacherServerConfig
from services.config.workers import QueueConfig, ScorerConfig
from services.queue.connection import connect_async
from services.queue.keys import DEAD, ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.workers.scorer import Scorer
from teacher_server.hf_backend import HFTeacherEngine
from tests.integration.groups import scored_group
from tests.teacher_support import ThreadedServer
from trainer.train import Trainer

pytestmark = pytest.mark.slow

K = 4


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Iterator[str]:
    config = TeacherServerConfig(model=str(tiny_teacher), backend="hf", dtype="float32")
    with ThreadedServer(config, HFTeacherEngine(config)) as server:
        yield server.url


def score_with_top_k(redis_url: str, groups: list[RolloutGroup], teacher_url: str) -> None:
    """Publish `groups` to the rollouts stream and have a scorer with top_k score them."""

    async def run() -> None:
        async with connect_async(redis_url) as client:
            queue = await AsyncQueue.open(client, "test", QueueConfig())
            for group in groups:
                await queue.publish(ROLLOUTS, group, counter="produced")
            deliveries = await queue.consume(ROLLOUTS, "scorer-a", count=len(groups))
            async with TeacherClient([teacher_url], health_interval_s=0) as client_:
                config = ScorerConfig(batch_groups=len(groups), top_k=K)
                scorer = Scorer(config, queue, client_, "scorer-a")
                await scorer.process_until_done(deliveries, lambda: False)

    asyncio.run(run())


def teacher_answer(teacher_url: str, groups: list[RolloutGroup]) -> list[tuple[list, list]]:
    """`TeacherClient.score(top_k=4)` of every completion, in order: (ids, logprobs)."""
    sequences = [
        ScoreSequence(token_ids=g.prompt_token_ids + c.token_ids, start=len(g.prompt_token_ids))
        for g in groups
        for c in g.completions
    ]

    async def score() -> list[tuple[list, list]]:
        async with TeacherClient([teacher_url], health_interval_s=0) as client:
            response = await client.score(sequences, top_k=K)
        return [(s.top_k_ids or [], s.top_k_logprobs or []) for s in response.scores]

    return asyncio.run(score())


def test_scored_groups_carry_the_teachers_top_k_and_a_kdrl_topk_step_trains_on_them(
    tmp_path: Path,
    teacher: str,
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    rng = random.Random(5)
    groups = [scored_group(i, rng, teacher=False) for i in range(2)]
    score_with_top_k(redis_url, groups, teacher)

    entries = fresh_redis.xrange(RunKeys("test").stream(SCORED))
    scored = [decode(fields[b"data"], RolloutGroup) for _, fields in entries]
    assert [g.group_id for g in scored] == ["group-0", "group-1"]
    completions = [c for g in scored for c in g.completions]
    for completion, (ids, logprobs) in zip(
        completions, teacher_answer(teacher, scored), strict=True
    ):
        top_k = completion.teacher_top_k
        assert top_k is not None and top_k.k == K
        assert top_k.id_array().shape == (len(completion.token_ids), K)
        assert top_k.id_array().tolist() == ids
        # stored as float16: the teacher's float32 values, rounded once
        expected = np.asarray(logprobs, dtype=np.float32).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(top_k.logprob_array(), expected)

    # A scored group without top-k (a scorer run with another config) on the same stream.
    bare = scored_group(9, rng)
    bare.teacher_revision = scored[0].teacher_revision
    queue = GroupQueue(fresh_redis, "test")
    queue.publish(SCORED, bare, counter="scored")

    run = RunConfig.model_validate(
        {
            "name": "top-k",
            "run_dir": str(tmp_path),
            "student": str(tiny_student),
            "teacher": str(tiny_student),
            "task": {"name": "kk"},
            "algorithm": {"name": "kdrl", "kd_estimator": "topk", "kd_anneal_steps": 0},
            "scorer": {"top_k": K},
            "rollout": {"group_size": 4},
            "trainer": {"lr": 1e-3, "steps": 1, "micro_batch_tokens": 64},
        }
    )
    trainer = Trainer(run, queue, rollout_urls=[])
    usable = trainer.take(3)
    assert [d.group.group_id for d in usable if d.group] == ["group-0", "group-1"]
    (dead,) = fresh_redis.xrange(RunKeys("test").stream(DEAD))
    assert decode(dead[1][b"data"], RolloutGroup).group_id == "group-9"
    assert "have no teacher top-k, which kd_estimator topk needs" in dead[1][b"reason"].decode()

    metrics = trainer.train_step([d.group for d in usable if d.group])
    assert metrics["skipped_update"] == 0 and metrics["grad_norm"] > 0
    # The top-k forward KL is at least m·log m ≥ −1/e per token, and here the two tiny
    # models (different seeds) disagree: positive.
    assert metrics["kd"] > 0 and metrics["kd_loss"] > 0
