"""The scorer under the retry policy (services/workers/scorer.py): it retries while no
teacher can score, leaves the groups pending when it is stopped (even mid-call), when Redis
goes away or when it hits an unexpected error, and then retries them one at a time; a
failure to record the latency costs no group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
import redis

from services.clients.teacher import TeacherClient, TeacherUnavailable
from services.common.protocol import (
    CompletionRecord,
    GenerateResponse,
    RolloutGroup,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
)
from services.common.wire import decode
from services.config.workers import QueueConfig, ScorerConfig
from services.queue.connection import connect_async
from services.queue.keys import DEAD, ROLLOUTS, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.workers import scorer as scorer_module
from services.workers.scorer import Scorer
from tests.server_support import ScriptedServer

GENERATED = GenerateResponse(policy_version=3, results=[])


class FlakyTeacher:
    """No teacher answers for the first `unavailable` calls (or until told to stop)."""

    def __init__(self, unavailable: int) -> None:
        self.unavailable = unavailable
        self.calls = 0

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        if self.calls <= self.unavailable:
            raise TeacherUnavailable("no teacher replica answered")
        return ScoreResponse(
            model="teacher",
            revision="r1",
            scores=[
                SequenceScores(logprobs=[-0.5] * (len(s.token_ids) - s.start)) for s in sequences
            ],
        )


def rollout_group() -> RolloutGroup:
    """Rewards that differ: a group the scorer must score (equal ones it would skip)."""
    return RolloutGroup(
        group_id="g0",
        prompt_id="p0",
        task="test",
        policy_version=0,
        prompt_token_ids=[1, 2, 3],
        completions=[
            CompletionRecord(
                token_ids=[4, 5], rollout_logprobs=[-0.5, -1.0], reward=reward, finish_reason="stop"
            )
            for reward in (1.0, 0.0)
        ],
    )


async def score_pending(
    redis_url: str,
    teacher: object,
    should_stop: Callable[[], bool],
    groups: int = 1,
) -> None:
    """Publish `groups` groups and have one scorer take and score them as one batch."""
    async with connect_async(redis_url) as client:
        queue = await AsyncQueue.open(client, "test")
        for _ in range(groups):
            await queue.publish(ROLLOUTS, rollout_group(), counter="produced")
        scorer = Scorer(ScorerConfig(mode="teacher"), queue, teacher, "scorer-a")
        deliveries = await queue.consume(ROLLOUTS, "scorer-a", count=groups)
        await scorer.process_until_done(deliveries, should_stop)


def score_pending_group(
    redis_url: str, teacher: FlakyTeacher, should_stop: Callable[[], bool]
) -> None:
    asyncio.run(score_pending(redis_url, teacher, should_stop))


def test_scorer_retries_while_no_teacher_answers(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)
    teacher = FlakyTeacher(unavailable=2)
    score_pending_group(redis_url, teacher, should_stop=lambda: False)
    assert teacher.calls == 3
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1, "scored": 1, "scored_by_pool:default": 1}
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []


def test_a_stopped_scorer_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)
    teacher = FlakyTeacher(unavailable=1_000)
    score_pending_group(redis_url, teacher, should_stop=lambda: teacher.calls >= 2)
    assert teacher.calls == 2
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1  # another scorer reclaims it


class RedisGoneTeacher(FlakyTeacher):
    """Redis goes away while the group is being scored (e.g. `docker compose restart redis`)."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        raise redis.exceptions.ConnectionError("Connection closed by server.")


def test_a_redis_error_while_scoring_leaves_the_group_pending(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        score_pending_group(redis_url, RedisGoneTeacher(unavailable=0), should_stop=lambda: False)
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}  # not dead-lettered as a refusal of the teacher
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1  # redelivered once reclaimed


def stop_after(seconds: float) -> Callable[[], bool]:
    began = time.monotonic()
    return lambda: time.monotonic() > began + seconds


def test_a_garbled_teacher_answer_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)

    async def run() -> None:
        async with (
            ScriptedServer([], GENERATED) as server,  # 200, but no ScoreResponse
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            await score_pending(redis_url, client, stop_after(0.5), groups=4)
        assert len(server.requests) > 1  # retried

    asyncio.run(run())
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 4}  # nothing dead-lettered
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 4


def test_a_failure_to_record_the_latency_costs_no_group(
    fresh_redis: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fresh_redis.set(
        RunKeys("test").teacher_latency, "not a list"
    )  # every write to it fails (WRONGTYPE)
    with caplog.at_level(logging.WARNING, logger=scorer_module.__name__):
        asyncio.run(score_pending(redis_url, FlakyTeacher(0), lambda: False, groups=2))
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 2, "scored": 2, "scored_by_pool:default": 2}
    assert "teacher latency not recorded" in caplog.text and "WRONGTYPE" in caplog.text


class HangingTeacher(FlakyTeacher):
    """Never answers within the test: a teacher call that runs until its deadline."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def test_a_stop_interrupts_a_teacher_call_and_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    teacher = HangingTeacher(unavailable=0)
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(score_pending(redis_url, teacher, stop_after(0.3)), 10))
    assert time.monotonic() - began < 3.0
    assert teacher.calls == 1
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1


class BuggyTeacher(FlakyTeacher):
    """Scores any batch without token 66, and fails like a bug on one with it."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        if any(66 in s.token_ids for s in sequences):
            raise KeyError("a bug")
        return await super().score(sequences)


def test_an_unexpected_error_leaves_the_batch_pending_and_then_fails_alone(
    fresh_redis: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = GroupQueue(fresh_redis, "test")
    config = QueueConfig(claim_idle_ms=100, max_deliveries=2)
    bad = rollout_group()
    bad.group_id, bad.prompt_token_ids = "bad", [66, 2, 3]

    def done() -> bool:
        stats = queue.stats()
        return stats.get("scored", 0) + stats.get("dead", 0) == 3

    async def run() -> None:
        async with connect_async(redis_url) as client:
            aqueue = await AsyncQueue.open(client, "test", config)
            for group in (rollout_group(), bad, rollout_group()):
                await aqueue.publish(ROLLOUTS, group, counter="produced")
            scorer = Scorer(ScorerConfig(batch_groups=3), aqueue, BuggyTeacher(0), "scorer-a")
            deadline = time.monotonic() + 20
            await scorer.run(lambda: done() or time.monotonic() > deadline)

    with caplog.at_level(logging.ERROR, logger=scorer_module.__name__):
        asyncio.run(run())
    # The first failure parked nothing: the batch was delivered again, one group at a
    # time, and only the group that kept failing was parked, by the delivery bound.
    assert queue.stats() == {"produced": 3, "scored": 2, "dead": 1, "scored_by_pool:default": 2}
    (letter,) = fresh_redis.xrange(RunKeys("test").stream(DEAD))
    assert decode(letter[1][b"data"], RolloutGroup).group_id == "bad"
    assert letter[1][b"reason"] == b"delivered 3 times without being acknowledged"
    assert "scoring 3 groups failed unexpectedly; they stay pending" in caplog.text
