"""Discovery through the run's Redis: teacher and rollout servers announce themselves, and
the processes that call them (scorers, rollout workers, the trainer) follow who is there.

A server started with `--register REDIS_URL` writes its `ServerRecord` every
`HEARTBEAT_S` (`Registration`, driven by `services.common.http_transport.serve`); a
record whose heartbeat is `TTL_S` overdue is gone. A server stopped by SIGTERM first
marks itself `draining` (clients stop sending to it at their next look), finishes its
requests in flight, then removes its record; one killed -9 simply expires.

Per role, a sorted set (server URL -> expiry, in the Redis server's milliseconds) and a
hash (URL -> record). Why not one key per server with a TTL: listing those needs a SCAN
of the whole keyspace, which a Redis shared by several runs makes slow, every two seconds
in every client; here one script (`live_servers`) reads every live server of a role at
once and drops the expired ones it finds on the way, so a dead server disappears by
itself. Expiry is judged on the Redis server's clock alone, so hosts whose clocks
disagree still agree on who is alive.

    registry = AsyncServerRegistry(connect_async(url), run="run")
    async with following(registry, "teacher", teacher_client.set_urls):
        ...   # the client's replicas track the registered, non-draining teachers
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Literal

import redis
import redis.asyncio
from pydantic import BaseModel, Field, ValidationError

from services.common.protocol import ServerInfo
from services.queue.keys import RunKeys
from services.queue.runner import AsyncRunner, Runner, Script, Steps, command

log = logging.getLogger(__name__)

Role = Literal["teacher", "rollout"]
REGISTRY = "registry"  # what `--teacher-url` / `--rollout-url` say to follow the registry
HEARTBEAT_S = 2.0  # how often a registered server writes its record
TTL_S = 10.0  # a record this long without a heartbeat is gone (five missed heartbeats)
FOLLOW_S = 2.0  # how often a client reads the registry
# A Redis outage costs a server its heartbeats; it retries for less than the TTL so that
# the next heartbeat is not late on top of the outage.
HEARTBEAT_OUTAGE_S = TTL_S / 2
DEFAULT_POOL = "default"


class ServerRecord(BaseModel):
    """What a registered server says about itself (the value in the records hash)."""

    role: Role = Field(description="Which kind of server this is.")
    url: str = Field(description="Where clients reach it (`--advertise-url`).")
    model: str = Field(description="Model id or path the server was started with.")
    revision: str = Field(description="Hash of the weights it serves now.")
    policy_version: int | None = Field(
        default=None, description="Rollout servers: the version of the weights it serves."
    )
    pool: str = Field(
        default=DEFAULT_POOL, description="Which pool of servers it belongs to (`--pool`)."
    )
    draining: bool = Field(
        default=False, description="Stopping: clients send it nothing new, it finishes the rest."
    )


def announce(keys: RunKeys, record: ServerRecord, ttl_s: float = TTL_S) -> Steps[None]:
    """Write (or refresh) `record`; it lives `ttl_s` past this heartbeat."""
    yield Script(
        "heartbeat",
        [keys.servers(record.role), keys.server_records(record.role)],
        [record.url, record.model_dump_json(), int(ttl_s * 1000)],
    )


def withdraw(keys: RunKeys, role: Role, url: str) -> Steps[None]:
    """Remove a server at once (a clean stop); out of the sorted set first, so that no
    reader finds a member without its record."""
    yield command("zrem", keys.servers(role), url)
    yield command("hdel", keys.server_records(role), url)


def live_servers(keys: RunKeys, role: Role, pool: str | None = None) -> Steps[list[ServerRecord]]:
    """The records of `role` whose heartbeat is not overdue (of `pool` only, when given),
    draining ones included, sorted by URL; forgets the expired ones."""
    raw = yield Script("live_servers", [keys.servers(role), keys.server_records(role)], [])
    records = []
    for value in raw:
        if value is None:  # its record vanished between two commands of `withdraw`
            continue
        try:
            records.append(ServerRecord.model_validate_json(value))
        except ValidationError as exc:  # written by another rlad version: skip, say so
            log.warning("ignoring an unreadable %s registration: %s", role, exc)
    chosen = [r for r in records if pool is None or r.pool == pool]
    return sorted(chosen, key=lambda record: record.url)


def serving_urls(records: list[ServerRecord]) -> list[str]:
    """The URLs clients should send to: every record that is not draining."""
    return [record.url for record in records if not record.draining]


class AsyncServerRegistry:
    """A run's registry on `redis.asyncio` (servers, the scorer, the rollout worker)."""

    def __init__(
        self, client: redis.asyncio.Redis, run: str, outage_s: float = HEARTBEAT_OUTAGE_S
    ) -> None:
        self.keys = RunKeys(run)
        self._runner = AsyncRunner(client, outage_s)

    async def announce(self, record: ServerRecord, ttl_s: float = TTL_S) -> None:
        await self._runner.run(announce(self.keys, record, ttl_s))

    async def withdraw(self, role: Role, url: str) -> None:
        await self._runner.run(withdraw(self.keys, role, url))

    async def servers(self, role: Role, pool: str | None = None) -> list[ServerRecord]:
        return await self._runner.run(live_servers(self.keys, role, pool))


class ServerRegistry:
    """A run's registry with a blocking client (the trainer)."""

    def __init__(self, client: redis.Redis, run: str, outage_s: float = HEARTBEAT_OUTAGE_S):
        self.keys = RunKeys(run)
        self._runner = Runner(client, outage_s)

    def servers(self, role: Role, pool: str | None = None) -> list[ServerRecord]:
        return self._runner.run(live_servers(self.keys, role, pool))


class Registration:
    """One server's registration: what `serve` calls to announce, drain and withdraw it
    (the `Announcer` of services.common.http_transport)."""

    heartbeat_s = HEARTBEAT_S

    def __init__(self, registry: AsyncServerRegistry, url: str, pool: str = DEFAULT_POOL):
        self.registry = registry
        self.url = url.rstrip("/")
        self.pool = pool
        self.role: Role | None = None  # known from the first announcement

    async def announce(self, info: ServerInfo, draining: bool) -> None:
        self.role = info.role
        record = ServerRecord(
            role=info.role,
            url=self.url,
            model=info.model,
            revision=info.revision,
            policy_version=info.policy_version,
            pool=self.pool,
            draining=draining,
        )
        await self.registry.announce(record)

    async def withdraw(self) -> None:
        if self.role is not None:
            await self.registry.withdraw(self.role, self.url)


async def follow(
    registry: AsyncServerRegistry,
    role: Role,
    apply: Callable[[list[str]], None],
    interval_s: float = FOLLOW_S,
) -> None:
    """Every `interval_s`, hand `apply` the URLs of the registered, non-draining servers
    of `role`, until cancelled. A failed read keeps the servers of the last good one."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            apply(serving_urls(await registry.servers(role)))
        except redis.RedisError as exc:
            log.warning("could not read the %s registry (%s); keeping the servers known", role, exc)


@contextlib.asynccontextmanager
async def following(
    registry: AsyncServerRegistry,
    role: Role,
    apply: Callable[[list[str]], None],
    interval_s: float = FOLLOW_S,
) -> AsyncIterator[None]:
    """`apply` the registered servers now, then keep following them while inside."""
    apply(serving_urls(await registry.servers(role)))
    task = asyncio.create_task(follow(registry, role, apply, interval_s), name=f"follow-{role}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
