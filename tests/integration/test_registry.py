"""Discovery through the registry with real `rlad serve-teacher` processes (HF backend, a
tiny model), a real `rlad scorer --teacher-url registry` and a real Redis: a registered
teacher appears and, killed -9, expires by itself; a teacher that registers mid-run gets
the scorer's requests within seconds; a draining teacher gets none once its clients have
looked, and no group is lost."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from services.launch.processes import ManagedProcess
from services.queue.keys import ROLLOUTS
from services.queue.queues import GroupQueue
from services.queue.registry import (
    FOLLOW_S,
    TTL_S,
    ServerRecord,
    ServerRegistry,
)
from tests.integration.test_scorer import CLI, rollout_group, run_yaml
from tests.process_support import wait_for
from tests.teacher_support import start_teacher

pytestmark = pytest.mark.slow
RUN = "test"  # the name `run_yaml` gives the run
DRAIN_GRACE_S = 10.0  # the draining teacher's: ample on a slow, shared machine
# A new teacher is in the scorer's replicas one FOLLOW_S after it registers; then about
# every other request goes to it (more margin: CI machines are slow and shared).
JOIN_WITHIN_S = FOLLOW_S + 15


def registered(redis_url: str, role: str = "teacher") -> list[ServerRecord]:
    return ServerRegistry(redis.Redis.from_url(redis_url), RUN).servers(role)  # type: ignore[arg-type]


def teacher(model: Path, folder: Path, redis_url: str, *flags: str) -> tuple[ManagedProcess, str]:
    return start_teacher(
        model, folder, "--backend", "hf", "--register", redis_url, "--run", RUN, *flags
    )


def scored_requests(url: str, api_key: str | None = None) -> float:
    """Successful `/v1/score` answers so far, from the teacher's Prometheus metrics (read
    with `api_key` where the server requires one)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=5).text
    found = re.search(r'^rlad_teacher_requests_total\{status="200"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_registered_teacher_appears_and_expires_when_killed(
    tmp_path: Path, tiny_teacher: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    proc, url = teacher(tiny_teacher, tmp_path, redis_url, "--pool", "blue")
    try:
        wait_for(lambda: any(r.url == url for r in registered(redis_url)), 10, proc)
        (record,) = registered(redis_url)
        assert (record.role, record.model, record.pool, record.draining) == (
            "teacher",
            str(tiny_teacher),
            "blue",
            False,
        )
        assert record.revision == httpx.get(f"{url}/v1/info").json()["revision"]
        proc.kill()  # no goodbye: the record must go by itself
        killed_at = time.monotonic()
        assert [r.url for r in registered(redis_url)] == [url]
        while registered(redis_url):
            assert time.monotonic() - killed_at < TTL_S + 3, "the dead teacher never expired"
            time.sleep(0.2)
        assert time.monotonic() - killed_at > TTL_S - 2 * FOLLOW_S  # expired, not withdrawn
    finally:
        proc.stop()


class Feed:
    """Publishes rollout groups from a thread until stopped, keeping `BACKLOG` of them
    waiting for the scorer, so that it always has work and never falls far behind."""

    BACKLOG = 4

    def __init__(self, client: redis.Redis) -> None:
        self.queue = GroupQueue(client, RUN)
        self.published = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)
        self.thread.start()

    def _publish(self) -> None:
        while not self.done.is_set():
            if self.published - self.queue.stats().get("scored", 0) < self.BACKLOG:
                group = rollout_group(self.published % 100)  # ids inside the vocabulary
                self.queue.publish(ROLLOUTS, group, counter="produced")
                self.published += 1
            else:
                self.done.wait(0.02)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.published


@pytest.fixture
def feed(fresh_redis: redis.Redis) -> Iterator[Feed]:
    feed = Feed(fresh_redis)
    yield feed
    feed.stop()


def test_the_scorer_follows_teachers_that_join_and_drain(
    tmp_path: Path,
    tiny_student: Path,
    tiny_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
    feed: Feed,
) -> None:
    config = run_yaml(tmp_path, tiny_student, tiny_teacher, scorer={"batch_groups": 1})
    first, first_url = teacher(tiny_teacher, tmp_path, redis_url)
    argv = [*CLI, "scorer", "--config", str(config), "--teacher-url", "registry"]
    scorer = ManagedProcess(
        "scorer", [*argv, "--redis-url", redis_url], tmp_path / "scorer.log"
    ).start()
    second = None
    queue = GroupQueue(fresh_redis, RUN)
    try:
        wait_for(lambda: queue.stats().get("scored", 0) >= 5, 60, scorer)
        # A second teacher registers mid-run: requests reach it within seconds.
        second, second_url = teacher(
            tiny_teacher, tmp_path, redis_url, "--drain-grace-s", str(DRAIN_GRACE_S)
        )
        wait_for(lambda: len(registered(redis_url)) == 2, 10, second)
        joined = time.monotonic()
        wait_for(lambda: scored_requests(second_url) >= 2, JOIN_WITHIN_S, scorer)
        assert time.monotonic() - joined < JOIN_WITHIN_S

        # SIGTERM: it says it is draining and keeps serving; after one look of the clients
        # it gets nothing new, and it exits once its last request is answered.
        os.killpg(second.pid, signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: httpx.get(f"{second_url}/health").status_code == 503, 5, second)
        assert [r.draining for r in registered(redis_url) if r.url == second_url] == [True]
        # Every client has looked once by FOLLOW_S; the server serves on until DRAIN_GRACE_S.
        time.sleep(max(0.0, signalled + FOLLOW_S + 2 - time.monotonic()))
        settled = scored_requests(second_url)
        time.sleep(max(0.0, signalled + DRAIN_GRACE_S - 2 - time.monotonic()))
        assert scored_requests(second_url) == settled, "a draining teacher still got requests"
        second.wait(timeout_s=30)
        assert [r.url for r in registered(redis_url)] == [first_url]  # withdrawn on its way out

        # No group lost: everything published is scored (by the first teacher), none dead.
        published = feed.stop()
        wait_for(lambda: queue.stats().get("scored", 0) == published, 60, scorer)
        stats = queue.stats()
        assert (stats["produced"], stats.get("dead", 0)) == (published, 0)
    finally:
        scorer.stop()
        for proc in (second, first):
            if proc is not None:
                proc.stop()
