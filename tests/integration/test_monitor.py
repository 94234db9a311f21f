"""`rlad monitor` against a real Redis: exact counts from `--once --json`, rates between two
readings, the Prometheus exporter, and the figures while a real scorer process runs.

The queue is driven through `GroupQueue`, the same code the pipeline runs, into a state
whose every figure is known by construction (worked out in `built_queue`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.protocol import CompletionRecord, RolloutGroup
from services.common.runtime import free_port
from services.config.teachers import DEFAULT_POOL
from services.config.workers import QueueConfig
from services.launch.processes import ManagedProcess
from services.monitor.exporter import create_app
from services.monitor.snapshot import QueueSnapshot, read_snapshot, with_rates
from services.queue.keys import DEAD, ROLLOUTS, SCORED, SCORERS, RunKeys
from services.queue.queues import GroupQueue, QueueReader
from services.queue.state import scored_by_pool

RLAD = [sys.executable, "-m", "services.cli.main"]


def make_group(i: int, version: int = 0) -> RolloutGroup:
    completion = CompletionRecord(
        token_ids=[5, 6, 7], rollout_logprobs=[-0.1, -0.2, -0.3], reward=1.0, finish_reason="stop"
    )
    return RolloutGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        task="kk",
        policy_version=version,
        prompt_token_ids=[1, 2, 3],
        completions=[completion, completion],
        timestamps={"generated": time.time()},
    )


def monitor(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RLAD, "monitor", "--redis-url", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def built_queue(fresh_redis: redis.Redis) -> dict[str, str]:
    """7 produced; the scorer takes 6: forwards 4 (2 by the teacher, 1 skipped, 1 degraded),
    dead-letters 1, holds 1 (g5); the trainer takes 3 of the 4 scored: trains 1, drops 1 as
    stale, holds 1 until its checkpoint.
    Left: rollouts g5 (pending) + g6 (undelivered); scored s2 (pending) + s3 (undelivered).
    Accounts: produced 7 = trained 1 + stale 1 + dead 1 + 2 in rollouts + 2 in scored."""
    queue = GroupQueue(fresh_redis, "test", QueueConfig())
    ids = [queue.publish(ROLLOUTS, make_group(i), counter="produced") for i in range(7)]
    taken = queue.consume(ROLLOUTS, "scorer-a", count=6, block_ms=100, reclaim=False)
    assert [d.message_id for d in taken] == ids[:6]
    scored_ids = []
    # Of the 4 scored, one went on without its teacher call (all rewards equal) and one
    # degraded (no teacher answered): both counted as scored and as such; the run's one
    # teacher, the pool `default`, scored the other two.
    by_teacher = scored_by_pool(DEFAULT_POOL)
    how = [by_teacher, "skipped_zero_variance", "degraded_groups", by_teacher]
    for delivery, also in zip(taken[:4], how, strict=True):
        assert delivery.group is not None
        new_id = queue.forward(
            ROLLOUTS, delivery.message_id, SCORED, delivery.group, "scored", also
        )
        assert new_id is not None
        scored_ids.append(new_id)
    queue.dead_letter(ROLLOUTS, taken[4].message_id, "scoring failed: teacher said 422")
    trained = queue.consume(SCORED, "trainer-0", count=3, block_ms=100, reclaim=False)
    queue.ack(SCORED, [trained[0].message_id], counter="trained")
    queue.ack(SCORED, [trained[1].message_id], counter="stale")
    fresh_redis.hset(
        RunKeys("test").trainer_state,
        mapping={"step": 12, "policy_version": 12, "updated_at": time.time() - 3},
    )
    fresh_redis.hset(
        RunKeys("test").trainer_state,
        mapping={"staleness_0": 5, "staleness_1": 2, "staleness_3": 1},
    )
    fresh_redis.lpush(RunKeys("test").teacher_latency, *[float(ms) for ms in range(1, 101)])
    return {"oldest_rollout": ids[5], "oldest_scored": scored_ids[2]}


def expected_age(client: redis.Redis, message_id: str) -> float:
    seconds, micros = client.time()
    return (seconds * 1000 + micros // 1000 - int(message_id.split("-")[0])) / 1000


def test_once_json_reports_exact_counts(
    built_queue: dict[str, str], fresh_redis: redis.Redis, redis_url: str
) -> None:
    result = monitor(redis_url, "--once", "--json")
    assert result.returncode == 0, result.stderr
    snapshot = QueueSnapshot.model_validate(json.loads(result.stdout))
    assert snapshot.streams == {ROLLOUTS: 2, SCORED: 2, DEAD: 1}
    assert snapshot.counters == {
        "produced": 7,
        "scored": 4,
        "trained": 1,
        "stale": 1,
        "dead": 1,
        "replayed": 0,
        "skipped_zero_variance": 1,
        "degraded_groups": 1,
    }
    assert snapshot.teacher_pools == {"default": 2}
    rollouts, scored = snapshot.group(ROLLOUTS), snapshot.group(SCORED)
    assert (rollouts.consumers, rollouts.pending, rollouts.lag) == (1, 1, 1)
    assert (scored.consumers, scored.pending, scored.lag) == (1, 1, 1)
    assert snapshot.backlog == 3  # 2 + 2 in the streams, less the 1 the trainer holds
    assert snapshot.rates is None  # one reading: counters only
    for group, oldest in ((rollouts, "oldest_rollout"), (scored, "oldest_scored")):
        assert group.oldest_age_s is not None
        assert 0 <= expected_age(fresh_redis, built_queue[oldest]) - group.oldest_age_s < 5
    assert snapshot.trainer.step == 12 and snapshot.trainer.policy_version == 12
    assert snapshot.trainer.seconds_since_update is not None
    assert 3 <= snapshot.trainer.seconds_since_update < 60  # the CLI's start: slow when loaded
    assert snapshot.trainer.staleness == {0: 5, 1: 2, 3: 1}
    assert snapshot.teacher_latency.samples == 100
    assert (snapshot.teacher_latency.p50_ms, snapshot.teacher_latency.p99_ms) == (50.0, 99.0)
    assert [(d.source, d.reason) for d in snapshot.recent_dead] == [
        (ROLLOUTS, "scoring failed: teacher said 422")
    ]
    tables = monitor(redis_url, "--once")
    assert tables.returncode == 0, tables.stderr
    assert "rollouts" in tables.stdout and "teacher said 422" in tables.stdout
    assert "scored by pool default" in tables.stdout


def test_rates_come_from_two_readings(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig())
    before = read_snapshot(QueueReader(fresh_redis, "test"))
    assert before.group(ROLLOUTS).oldest_age_s is None  # nothing waits in an empty queue
    for i in range(6):
        queue.publish(ROLLOUTS, make_group(i), counter="produced")
    time.sleep(0.2)
    after = with_rates(before, read_snapshot(QueueReader(fresh_redis, "test")))
    assert after.rates is not None
    elapsed = after.taken_at - before.taken_at
    assert after.rates["produced"] == pytest.approx(6 / elapsed)
    assert after.rates["scored"] == 0.0
    assert after.group(ROLLOUTS).lag == 6 and after.group(ROLLOUTS).consumers == 0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_exporter_serves_the_same_figures(
    built_queue: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    argv = [*RLAD, "monitor", "--redis-url", redis_url, "--serve-metrics", str(port)]
    proc = ManagedProcess("monitor", argv, tmp_path / "monitor.log").start()
    try:
        proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=60)
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        proc.stop()
    found = samples(page)
    rollouts = (("group", "scorers"), ("stream", ROLLOUTS))
    assert found[("rlad_monitor_redis_up", ())] == 1
    assert found[("rlad_queue_pending", rollouts)] == 1
    assert found[("rlad_queue_lag", rollouts)] == 1
    assert found[("rlad_queue_stream_length", (("stream", DEAD),))] == 1
    assert found[("rlad_pipeline_groups_total", (("event", "produced"),))] == 7
    assert found[("rlad_pipeline_groups_total", (("event", "stale"),))] == 1
    assert found[("rlad_pipeline_teacher_pool_groups_total", (("pool", "default"),))] == 2
    assert found[("rlad_trainer_step", ())] == 12
    assert found[("rlad_trainer_staleness_groups_total", (("versions_behind", "3"),))] == 1
    assert found[("rlad_scorer_teacher_latency_ms", (("quantile", "0.99"),))] == 99
    assert found[("rlad_queue_backlog", ())] == 3


def test_exporter_reports_an_unreachable_redis() -> None:
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    with TestClient(create_app(client, "test")) as http:
        assert http.get("/health").status_code == 503
        page = http.get("/metrics").text
    assert samples(page)[("rlad_monitor_redis_up", ())] == 0


def test_missing_redis_url_is_refused() -> None:
    result = subprocess.run(
        [*RLAD, "monitor", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr


class AcksAfterInfo:
    """A client whose consumer acknowledges everything pending right after XINFO GROUPS,
    the race a live scorer makes against a monitor reading."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def xinfo_groups(self, stream: str) -> list[dict[str, object]]:
        rows = self.client.xinfo_groups(stream)
        for row in rows:
            for entry in self.client.xpending_range(stream, row["name"], "-", "+", 100):
                self.client.xack(stream, row["name"], entry["message_id"])
        return rows

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)


def test_a_group_acknowledged_mid_reading_is_not_an_error(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, "test", QueueConfig())
    queue.publish(ROLLOUTS, make_group(0), counter="produced")
    queue.consume(ROLLOUTS, "scorer-a", count=1, block_ms=100, reclaim=False)
    snapshot = read_snapshot(QueueReader(AcksAfterInfo(fresh_redis), "test"))  # type: ignore[arg-type]
    # XINFO saw one pending entry; by XPENDING it was gone, so no age is known for it.
    assert snapshot.group(ROLLOUTS).pending == 1
    assert snapshot.group(ROLLOUTS).oldest_age_s is None
    assert fresh_redis.xpending(RunKeys("test").stream(ROLLOUTS), SCORERS)["pending"] == 0


@pytest.fixture
def scorer_process(fresh_redis: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[None]:
    """A real `rlad scorer` in passthrough mode (plain GRPO: no teacher to start)."""
    config = {
        "name": "monitor-test",
        "run_dir": str(tmp_path / "runs"),
        "student": "unused-by-the-scorer",
        "task": {"name": "kk"},
        "algorithm": {"name": "grpo"},
        "scorer": {"mode": "passthrough", "batch_groups": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [*RLAD, "scorer", "--config", str(path), "--redis-url", redis_url, "--consumer", "s1"]
    proc = ManagedProcess("scorer", argv, tmp_path / "scorer.log").start()
    yield
    proc.stop()


def test_counts_while_a_real_scorer_runs(
    scorer_process: None, fresh_redis: redis.Redis, redis_url: str
) -> None:
    queue = GroupQueue(fresh_redis, "monitor-test", QueueConfig())  # the scorer's run
    for i in range(9):
        queue.publish(ROLLOUTS, make_group(i), counter="produced")
    deadline = time.monotonic() + 45
    while read_snapshot(QueueReader(fresh_redis, "monitor-test")).counters["scored"] < 9:
        assert time.monotonic() < deadline, "the scorer did not forward the groups in time"
        time.sleep(0.2)
    result = monitor(redis_url, "--once", "--json")
    assert result.returncode == 0, result.stderr
    snapshot = QueueSnapshot.model_validate(json.loads(result.stdout))
    assert snapshot.counters["produced"] == 9 and snapshot.counters["scored"] == 9
    rollouts, scored = snapshot.group(ROLLOUTS), snapshot.group(SCORED)
    assert (rollouts.consumers, rollouts.pending, rollouts.lag) == (1, 0, 0)
    assert snapshot.streams[ROLLOUTS] == 0  # forwarded entries are acknowledged and trimmed
    assert (snapshot.streams[SCORED], scored.lag, scored.pending) == (9, 9, 0)
    assert scored.oldest_age_s is not None and scored.oldest_age_s >= 0
    assert snapshot.backlog == 9
    # No trainer here, and the scorer's teacher-latency list stays empty in passthrough mode.
    assert snapshot.trainer.step is None and snapshot.teacher_latency.samples == 0
