"""The server registry on a real Redis: records appear, refresh, expire by themselves on
the Redis clock, are withdrawn, filtered by pool; and the clients change their servers at
run time without losing what they know of the ones they keep."""

from __future__ import annotations

import asyncio
import time

import redis

from services.clients.replicas import ReplicaSet
from services.clients.rollout import RolloutClient
from services.clients.teacher import TeacherClient
from services.queue.connection import connect_async
from services.queue.keys import RunKeys
from services.queue.registry import (
    AsyncServerRegistry,
    ServerRecord,
    ServerRegistry,
    following,
    serving_urls,
)


def record(url: str, **fields: object) -> ServerRecord:
    base = {"role": "teacher", "url": url, "model": "m", "revision": "r1"}
    return ServerRecord.model_validate({**base, **fields})


def test_records_appear_refresh_and_expire(redis_url: str, fresh_redis: redis.Redis) -> None:
    async def scenario() -> None:
        async with connect_async(redis_url) as client:
            registry = AsyncServerRegistry(client, "reg")
            await registry.announce(record("http://a:1"), ttl_s=0.5)
            await registry.announce(record("http://b:1", pool="blue"), ttl_s=5)
            assert [r.url for r in await registry.servers("teacher")] == [
                "http://a:1",
                "http://b:1",
            ]
            assert [r.url for r in await registry.servers("teacher", pool="blue")] == ["http://b:1"]
            assert await registry.servers("rollout") == []
            # A heartbeat replaces the record (a new revision) and pushes the expiry back.
            await asyncio.sleep(0.3)
            await registry.announce(record("http://a:1", revision="r2"), ttl_s=0.5)
            await asyncio.sleep(0.3)
            live = await registry.servers("teacher")
            assert [(r.url, r.revision) for r in live] == [
                ("http://a:1", "r2"),
                ("http://b:1", "r1"),
            ]
            await asyncio.sleep(0.4)  # a's last heartbeat is now overdue
            assert [r.url for r in await registry.servers("teacher")] == ["http://b:1"]

    asyncio.run(scenario())
    # The reader that found it expired removed it from both keys.
    keys = RunKeys("reg")
    assert fresh_redis.hkeys(keys.server_records("teacher")) == [b"http://b:1"]
    assert fresh_redis.zcard(keys.servers("teacher")) == 1


def test_withdraw_and_draining(redis_url: str, fresh_redis: redis.Redis) -> None:
    async def scenario() -> list[ServerRecord]:
        async with connect_async(redis_url) as client:
            registry = AsyncServerRegistry(client, "reg")
            for url in ("http://a:1", "http://b:1", "http://c:1"):
                await registry.announce(record(url))
            await registry.announce(record("http://b:1", draining=True))
            await registry.withdraw("teacher", "http://c:1")
            return await registry.servers("teacher")

    live = asyncio.run(scenario())
    assert [(r.url, r.draining) for r in live] == [("http://a:1", False), ("http://b:1", True)]
    assert serving_urls(live) == ["http://a:1"]
    # The blocking reader (the trainer's) sees the same.
    assert [r.url for r in ServerRegistry(fresh_redis, "reg").servers("teacher")] == [
        "http://a:1",
        "http://b:1",
    ]


def test_an_unreadable_record_is_skipped(redis_url: str, fresh_redis: redis.Redis) -> None:
    keys = RunKeys("reg")
    fresh_redis.zadd(keys.servers("rollout"), {"http://x:1": time.time() * 1000 + 60_000})
    fresh_redis.hset(keys.server_records("rollout"), "http://x:1", b'{"role": "rollout"}')
    good = record("http://y:1", role="rollout", policy_version=3)

    async def scenario() -> list[ServerRecord]:
        async with connect_async(redis_url) as client:
            registry = AsyncServerRegistry(client, "reg")
            await registry.announce(good)
            return await registry.servers("rollout")

    assert asyncio.run(scenario()) == [good]


def test_following_applies_the_registry_as_it_changes(
    redis_url: str, fresh_redis: redis.Redis
) -> None:
    seen: list[list[str]] = []

    async def scenario() -> None:
        async with connect_async(redis_url) as client:
            registry = AsyncServerRegistry(client, "reg")
            await registry.announce(record("http://a:1"))
            async with following(registry, "teacher", seen.append, interval_s=0.05):
                assert seen == [["http://a:1"]]  # applied before the block runs
                await registry.announce(record("http://b:1"))
                await registry.announce(record("http://a:1", draining=True))
                await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert seen[-1] == ["http://b:1"]


def test_replica_set_keeps_the_state_of_replicas_it_keeps() -> None:
    pool = ReplicaSet(["http://a:1", "http://b:1"], breaker_failures=1, breaker_open_s=60)
    a, b = pool.replicas
    pool.failed(a, "boom")  # a's breaker opens
    b.outstanding = 2  # a request in flight on b
    added, removed = pool.set_urls(["http://a:1/", "http://c:1"])
    assert (added, removed) == (["http://c:1"], ["http://b:1"])
    assert [r.url for r in pool.replicas] == ["http://a:1", "http://c:1"]
    assert pool.replicas[0] is a and not a.available(time.monotonic())
    # b is never picked again; its request in flight holds its own reference.
    assert pool.pick(set()) is pool.replicas[1]
    assert b.outstanding == 2
    pool.set_urls([])
    assert pool.pick(set()) is None and not pool.any_reachable()
    assert "no teacher replica" in pool.describe()


def test_clients_start_empty_only_when_following_a_registry() -> None:
    for make in (TeacherClient, RolloutClient):
        try:
            make([])
        except ValueError:
            pass
        else:
            raise AssertionError(f"{make.__name__}([]) must refuse to start with no server")

    async def scenario() -> None:
        rollout = RolloutClient([], follows_registry=True, deadline_s=0.3)
        rollout.set_urls(["http://r:1/", "http://r:1"])
        assert rollout.urls == ["http://r:1"]
        rollout.set_urls([])
        began = time.monotonic()
        try:
            await rollout.info()
        except Exception as exc:  # waits for a server up to the deadline, then says so
            assert "no rollout server registered" in str(exc)
        assert time.monotonic() - began >= 0.3
        await rollout.aclose()
        teacher = TeacherClient([], follows_registry=True, health_interval_s=0)
        teacher.set_urls(["http://t:1"])
        assert [r.url for r in teacher.replicas] == ["http://t:1"]

    asyncio.run(scenario())
