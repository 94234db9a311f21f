"""How the queue's operations reach Redis.

Each operation (services/queue/streams.py, state.py, readings.py) is written once as
`Steps`: a generator that yields the Redis calls it needs and receives each reply, so it
holds the logic and no I/O. `Runner` performs the calls with a blocking `redis.Redis`
(trainer, monitor, launcher), `AsyncRunner` with `redis.asyncio.Redis` (the scorer and the
rollout worker, whose event loop must not block on Redis). A Redis error is thrown back
into the operation at the step that caused it, so an operation may handle the errors it
expects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio

from services.queue.lua import SCRIPTS

T = TypeVar("T")


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


class Runner:
    """Runs operations with a blocking client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}

    def run(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: redis.RedisError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                reply, error = self._perform(call), None
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

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}

    async def run(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: redis.RedisError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                reply, error = await self._perform(call), None
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
