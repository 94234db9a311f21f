"""How the queue's operations reach Redis.

Each operation (services/queue/streams.py, state.py, readings.py) is written once as
`Steps`: a generator that yields the Redis calls it needs and receives each reply, so it
holds the logic and no I/O. `Runner` performs the calls with a blocking `redis.Redis`
(trainer, monitor, launcher), `AsyncRunner` with `redis.asyncio.Redis` (the scorer and the
rollout worker, whose event loop must not block on Redis). A Redis error is thrown back
into the operation at the step that caused it, so an operation may handle the errors it
expects.

A Redis that is unreachable (restarting, loading its AOF, a network blip) is ridden out
call by call: each call is retried with backoff for up to `outage_s` before its error is
thrown. The queue's scripts are written so that a call retried after its reply was lost
does not count or forward a group twice (services/queue/lua.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
)

from services.common.backoff import jittered_exponential
from services.queue.lua import SCRIPTS

T = TypeVar("T")
log = logging.getLogger(__name__)

# A restarting server refuses connections, drops them, or answers LOADING (a subclass of
# ConnectionError) while it reads its AOF. A refused password is a ConnectionError to
# redis-py too, but no outage: waiting would only delay the error that says what to fix.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
NOT_OUTAGES = (redis.AuthenticationError,)
OUTAGE_LOG_EVERY = 10  # attempts: an outage is logged when it starts and then now and then


@dataclass(frozen=True)
class Command:
    """A redis-py client method by name, with its arguments."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Script:
    """One of the scripts of services/queue/lua.py, by name."""

    name: str
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class Pause:
    """Wait before the next step (polling)."""

    seconds: float


Call = Command | Script | Pause
Steps = Generator[Call, Any, T]


def command(method: str, *args: Any, **kwargs: Any) -> Command:
    return Command(method, args, kwargs)


def text(value: Any) -> str:
    """A reply value as text (replies are bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _log_outage(state: RetryCallState) -> None:
    if state.attempt_number % OUTAGE_LOG_EVERY == 1:
        error = state.outcome.exception() if state.outcome else None
        log.warning("Redis unreachable for %.1f s (%s); retrying", state.seconds_since_start, error)


def _outage_policy(outage_s: float) -> dict[str, Any]:
    """Backoff from 0.1 s doubling to 2 s, with jitter so that the processes of a run do
    not all reconnect at once; after `outage_s` the error is raised."""
    return {
        "retry": retry_if_exception_type(OUTAGE_ERRORS) & retry_if_not_exception_type(NOT_OUTAGES),
        "stop": stop_after_delay(outage_s),
        "wait": jittered_exponential(0.1, 2.0),
        "before_sleep": _log_outage,
        "reraise": True,
    }


class Runner:
    """Runs operations with a blocking client; `outage_s` 0: no retry (a reader that
    should say at once that Redis is gone)."""

    def __init__(self, client: redis.Redis, outage_s: float = 0.0) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        self.retrying = Retrying(**_outage_policy(outage_s))

    def run(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: redis.RedisError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                reply, error = self.retrying.copy()(self._perform, call), None
            except redis.RedisError as exc:
                reply, error = None, exc

    def _perform(self, call: Call) -> Any:
        match call:
            case Command(method, args, kwargs):
                return getattr(self.client, method)(*args, **kwargs)
            case Script(name, keys, args):
                return self.scripts[name](keys=keys, args=args)
            case Pause(seconds):
                time.sleep(seconds)


class AsyncRunner:
    """Runs operations with a `redis.asyncio` client, on the running event loop."""

    def __init__(self, client: redis.asyncio.Redis, outage_s: float = 0.0) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        self.retrying = AsyncRetrying(**_outage_policy(outage_s))

    async def run(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: redis.RedisError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                # A copy per call: concurrent operations on one loop must not share state.
                reply, error = await self.retrying.copy()(self._perform, call), None
            except redis.RedisError as exc:
                reply, error = None, exc

    async def _perform(self, call: Call) -> Any:
        match call:
            case Command(method, args, kwargs):
                return await getattr(self.client, method)(*args, **kwargs)
            case Script(name, keys, args):
                return await self.scripts[name](keys=keys, args=args)
            case Pause(seconds):
                await asyncio.sleep(seconds)
