"""`rlad dead list|replay` and the choice of run by `rlad monitor`, as an operator runs
them: real processes against a real Redis, clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import redis

from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import GroupQueue, QueueReader
from tests.integration.groups import small_group

RLAD = [sys.executable, "-m", "services.cli.main"]


def rlad(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RLAD, *args, "--redis-url", redis_url], capture_output=True, text=True, timeout=60
    )


def park(queue: GroupQueue, stream: str, index: int, reason: str) -> None:
    queue.publish(stream, small_group(index), counter="produced")
    [delivery] = queue.consume(stream, "consumer", reclaim=False)
    queue.dead_letter(stream, delivery.message_id, reason)


def test_list_then_replay_every_dead_letter(fresh_redis: redis.Redis, redis_url: str) -> None:
    queue = GroupQueue(fresh_redis, "test")
    park(queue, ROLLOUTS, 0, "teacher refused token id 300")
    park(queue, SCORED, 1, "completion 0 has 2 rollout logprobs for 97 tokens")
    table = rlad(redis_url, "dead", "list")
    assert table.returncode == 0, table.stderr
    assert "2 dead letters" in table.stdout
    listed = rlad(redis_url, "dead", "list", "--json")
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(d["source"], d["reason"]) for d in letters] == [
        (SCORED, "completion 0 has 2 rollout logprobs for 97 tokens"),
        (ROLLOUTS, "teacher refused token id 300"),
    ]
    replayed = rlad(redis_url, "dead", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 2 of 2" in replayed.stdout
    # Each is back on the stream it came from, counted as queued again.
    assert [d.group.group_id for d in queue.consume(ROLLOUTS, "scorer") if d.group] == ["g0"]
    [again] = queue.consume(SCORED, "trainer-0", reclaim=False)
    assert again.group is not None and again.group.group_id == "g1"
    accounts = QueueReader(fresh_redis, "test").accounts()
    assert accounts["dead"] == 0 and accounts["replayed"] == 2


def test_replay_says_which_ids_are_not_dead_letters(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    queue = GroupQueue(fresh_redis, "test")
    park(queue, ROLLOUTS, 0, "bad")
    [letter] = QueueReader(fresh_redis, "test").recent_dead(1)
    result = rlad(redis_url, "dead", "replay", letter.id, "42-0")
    assert result.returncode == 1
    assert "replayed 1 of 2" in result.stdout and "42-0" in result.stderr


def test_bad_invocations_are_usage_errors(fresh_redis: redis.Redis, redis_url: str) -> None:
    GroupQueue(fresh_redis, "run-a")
    GroupQueue(fresh_redis, "run-b")
    both = rlad(redis_url, "dead", "replay", "1-0", "--all", "--run", "run-a")
    assert both.returncode == 2 and "not both" in both.stderr
    unnamed = rlad(redis_url, "dead", "list")
    assert unnamed.returncode == 2 and "run-a, run-b" in unnamed.stderr
    bad_name = rlad(redis_url, "dead", "list", "--run", "a:*")
    assert bad_name.returncode == 2 and "run name" in bad_name.stderr
    watched = rlad(redis_url, "monitor", "--once")
    assert watched.returncode == 2 and "--run" in watched.stderr
    assert rlad(redis_url, "monitor", "--once", "--run", "run-b").returncode == 0


def test_nothing_to_read_yet(fresh_redis: redis.Redis, redis_url: str) -> None:
    result = rlad(redis_url, "dead", "list")
    assert result.returncode == 2 and "no run has a queue" in result.stderr
