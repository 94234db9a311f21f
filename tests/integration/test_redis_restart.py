"""Every process rides out a Redis restart: a `redis-server` with AOF killed (-9, or
SHUTDOWN NOSAVE) and started again on the same port; the blocking and the asyncio queue
keep their place, nothing is lost, and an outage longer than `queue.redis_outage_s`
surfaces as the Redis error."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from services.common.runtime import free_port
from services.config.workers import QueueConfig
from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import AsyncQueue, GroupQueue, QueueReader
from tests.integration.groups import small_group as make_group

BINARY = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(BINARY is None, reason="needs the redis-server binary")


class RedisProcess:
    """A redis-server with AOF (fsync on every write) in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert BINARY is not None
        argv = [BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart_after(self, delay_s: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay_s), self.start()))
        thread.start()
        return thread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    process = RedisProcess(tmp_path)
    process.start()
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()


def test_the_blocking_queue_rides_out_a_kill_9(server: RedisProcess) -> None:
    queue = GroupQueue(redis.Redis.from_url(server.url), "test", QueueConfig(redis_outage_s=30))
    for i in range(2):
        queue.publish(ROLLOUTS, make_group(i), counter="produced")
    [first] = queue.consume(ROLLOUTS, "scorer")
    server.kill()
    restarted = server.restart_after(1.5)
    # Called while Redis is down: retried until it is back, then done once.
    queue.forward(ROLLOUTS, first.message_id, SCORED, make_group(0), counter="scored")
    [second] = queue.consume(ROLLOUTS, "scorer")
    restarted.join()
    assert second.group is not None and second.group.group_id == "g1"
    accounts = QueueReader(redis.Redis.from_url(server.url), "test").accounts()
    assert accounts == {"produced": 2, "scored": 1, "in_rollouts": 1, "in_scored": 1}


def test_the_asyncio_queue_rides_out_a_shutdown(server: RedisProcess) -> None:
    async def scenario() -> list[str]:
        client = redis.asyncio.Redis.from_url(server.url)
        queue = await AsyncQueue.open(client, "test", QueueConfig(redis_outage_s=30))
        await queue.publish(ROLLOUTS, make_group(0), counter="produced")
        redis.Redis.from_url(server.url).shutdown(nosave=True)  # AOF keeps every write
        server.proc.wait()  # type: ignore[union-attr]
        restarted = server.restart_after(1.0)
        published = await queue.publish(ROLLOUTS, make_group(1), counter="produced")
        taken = await queue.consume(ROLLOUTS, "scorer", count=10)
        await asyncio.to_thread(restarted.join)
        await client.aclose()
        assert published
        return [d.group.group_id for d in taken if d.group]

    assert asyncio.run(scenario()) == ["g0", "g1"]


def test_an_outage_longer_than_the_bound_raises(server: RedisProcess) -> None:
    queue = GroupQueue(redis.Redis.from_url(server.url), "test", QueueConfig(redis_outage_s=1))
    server.kill()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        queue.publish(ROLLOUTS, make_group(0))
    assert 1.0 <= time.monotonic() - started < 10
