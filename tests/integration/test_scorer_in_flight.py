"""A scorer with several batches at the teacher at once, against a real teacher server (hf
backend, in this process, each request delayed like a distant replica's) and a real Redis:
`max_in_flight` requests are at the teacher together, every group is forwarded once and
acknowledged, the scorer never reclaims a batch it is still scoring, and a stop mid-flight
leaves every unfinished group pending for another scorer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.config.servers import TeacherServerConfig
from services.config.workers import QueueConfig, ScorerConfig
from services.queue.keys import ROLLOUTS, SCORED, RunKeys
from services.queue.queues import GroupQueue
from teacher_server.app import create_app
from teacher_server.hf_backend import HFTeacherEngine
from tests.integration.test_scorer import scored_groups
from tests.integration.test_scorer_modes import group, run_scorer
from tests.server_support import ThreadedServer

LATENCY_MS = 600.0


class ConcurrencyProbe:
    """The teacher's ASGI app, counting the score requests in progress and the most seen
    at once (the server's one event loop runs every request, so no lock is needed)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.now = 0
        self.most = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/score":
            await self.app(scope, receive, send)
            return
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await self.app(scope, receive, send)
        finally:
            self.now -= 1


@pytest.fixture(scope="module")
def slow_teacher(tiny_teacher: Path) -> Iterator[tuple[str, ConcurrencyProbe]]:
    config = TeacherServerConfig(
        model=str(tiny_teacher), backend="hf", inject_latency_ms=LATENCY_MS
    )
    probe = ConcurrencyProbe(create_app(config, HFTeacherEngine(config)))
    with ThreadedServer(probe, config.header_timeout_s) as server:
        yield server.url, probe


def publish(queue: GroupQueue, count: int) -> None:
    for i in range(count):  # rewards that differ: every group needs the teacher
        queue.publish(ROLLOUTS, group(i, [1.0, 0.0]), counter="produced")


def test_several_batches_are_at_the_teacher_at_once_and_each_group_is_forwarded_once(
    slow_teacher: tuple[str, ConcurrencyProbe], redis_url: str, fresh_redis: redis.Redis
) -> None:
    url, probe = slow_teacher
    probe.most = 0
    queue = GroupQueue(fresh_redis, "test")
    publish(queue, 16)
    # The teacher takes three times claim_idle_ms, and a second delivery parks a group: a
    # scorer that reclaimed its own batches in flight would dead-letter them.
    queue_config = QueueConfig(claim_idle_ms=200, max_deliveries=1)
    config = ScorerConfig(batch_groups=2, max_in_flight=4)
    run_scorer(redis_url, config, url, lambda q: q.stats().get("scored", 0) == 16, 60, queue_config)

    assert probe.most == 4  # max_in_flight batches, one request each
    assert queue.stats() == {"produced": 16, "scored": 16, "scored_by_pool:default": 16}
    entries = fresh_redis.xrange(RunKeys("test").stream(SCORED))
    assert len(entries) == 16
    scored = scored_groups(fresh_redis)
    assert sorted(scored) == sorted(f"g{i}" for i in range(16))
    assert all(c.teacher_logprobs for g in scored.values() for c in g.completions)
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []


def test_a_stop_mid_flight_leaves_every_unfinished_group_pending_for_another_scorer(
    slow_teacher: tuple[str, ConcurrencyProbe], redis_url: str, fresh_redis: redis.Redis
) -> None:
    url, probe = slow_teacher
    queue = GroupQueue(fresh_redis, "test")
    publish(queue, 8)
    config = ScorerConfig(batch_groups=2, max_in_flight=4)
    stopped_at: list[float] = []

    def all_at_the_teacher(_: GroupQueue) -> bool:
        if probe.now == 4 and not stopped_at:
            stopped_at.append(time.monotonic())
        return bool(stopped_at)

    run_scorer(redis_url, config, url, all_at_the_teacher, 30)
    assert stopped_at, "the four batches never were at the teacher together"
    # The watcher polls every 50 ms, each batch gives up within STOP_POLL_S (0.2 s).
    assert time.monotonic() - stopped_at[0] < 2.0
    assert queue.stats() == {"produced": 8}  # nothing forwarded, nothing parked
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 8

    time.sleep(0.3)  # idle past claim_idle_ms: another scorer reclaims them
    run_scorer(
        redis_url,
        config,
        url,
        lambda q: q.stats().get("scored", 0) == 8,
        60,
        QueueConfig(claim_idle_ms=200),
        consumer="scorer-b",
    )
    assert queue.stats() == {"produced": 8, "scored": 8, "scored_by_pool:default": 8}
    assert sorted(scored_groups(fresh_redis)) == sorted(f"g{i}" for i in range(8))
    assert fresh_redis.xlen(RunKeys("test").stream(SCORED)) == 8
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []
    assert queue.pending_for(ROLLOUTS, "scorer-b") == []
