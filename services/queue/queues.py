"""The queue of one run as each process holds it, one instance per process.

- `GroupQueue`: blocking, for the trainer (and tests and tools);
- `AsyncQueue`: on `redis.asyncio`, for the scorer and the rollout worker, whose event
  loop must not block on Redis;
- `QueueReader`: read-only figures for `rlad monitor` and `rlad up`.

Each is bound to a run name, which scopes every key it touches (services/queue/keys.py).
Each method runs the operation of the same name in streams.py, state.py or readings.py,
so the flavours differ only in how the Redis calls are made (services/queue/runner.py);
both ride out a Redis restart (retrying each call for `queue.redis_outage_s`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import redis
import redis.asyncio

from services.common.protocol import RolloutGroup
from services.config.workers import QueueConfig
from services.queue import readings, state, streams
from services.queue.keys import RunKeys
from services.queue.readings import DeadLetterEntry, GroupProgress
from services.queue.runner import AsyncRunner, Runner
from services.queue.state import TrainerProgress
from services.queue.streams import Delivery

# A consumer idle this long without a pending message belongs to a process that is gone.
GONE_CONSUMER_MS = 10 * 60 * 1000


class GroupQueue:
    """Blocking access to a run's streams and state; creates the consumer groups."""

    def __init__(self, client: redis.Redis, run: str, config: QueueConfig | None = None) -> None:
        self.config = config or QueueConfig()
        self.keys = RunKeys(run)
        self._runner = Runner(client, self.config.redis_outage_s)
        self._runner.run(streams.ensure_groups(self.keys))

    def publish(self, stream: str, group: RolloutGroup, counter: str | None = None) -> str:
        return self._runner.run(streams.publish(self.keys, stream, group, counter))

    def forward(
        self,
        source: str,
        message_id: str,
        target: str,
        group: RolloutGroup,
        counter: str,
        also: str | None = None,
    ) -> str | None:
        return self._runner.run(
            streams.forward(self.keys, source, message_id, target, group, counter, also)
        )

    def backlog(self) -> int:
        return self._runner.run(streams.backlog(self.keys, self.config.max_backlog))

    def wait_for_room(
        self, poll_s: float = 0.2, should_stop: Callable[[], bool] | None = None
    ) -> None:
        self._runner.run(
            streams.wait_for_room(self.keys, self.config.max_backlog, poll_s, should_stop)
        )

    def consume(
        self,
        stream: str,
        consumer: str,
        count: int = 1,
        block_ms: int = 1000,
        reclaim: bool = True,
    ) -> list[Delivery]:
        return self._runner.run(
            streams.consume(self.keys, self.config, stream, consumer, count, block_ms, reclaim)
        )

    def pending_for(self, stream: str, consumer: str) -> list[str]:
        return self._runner.run(streams.pending_for(self.keys, stream, consumer))

    def claim(self, stream: str, consumer: str, message_ids: list[str]) -> list[Delivery]:
        return self._runner.run(
            streams.claim(self.keys, self.config, stream, consumer, message_ids)
        )

    def ack(self, stream: str, message_ids: list[str], counter: str | None = None) -> int:
        return self._runner.run(streams.ack(self.keys, stream, message_ids, counter))

    def dead_letter(self, stream: str, message_id: str, reason: str) -> None:
        self._runner.run(streams.dead_letter(self.keys, stream, message_id, reason))

    def replay(self, dead_ids: list[str]) -> list[str]:
        return self._runner.run(streams.replay(self.keys, dead_ids))

    def stats(self) -> dict[str, int]:
        return self._runner.run(state.stats(self.keys))

    def publish_trainer_state(self, step: int, policy_version: int) -> None:
        self._runner.run(state.publish_trainer_state(self.keys, step, policy_version))

    def count_staleness(self, versions_behind: int) -> None:
        self._runner.run(state.count_staleness(self.keys, versions_behind))

    def claim_prompts(self, count: int) -> int:
        return self._runner.run(state.claim_prompts(self.keys, count))

    def prompt_low_water(self, trained: Collection[str] = ()) -> int:
        return self._runner.run(state.prompt_low_water(self.keys, trained))

    def restore_prompt_cursor(self, position: int) -> int:
        return self._runner.run(state.restore_prompt_cursor(self.keys, position))


class AsyncQueue:
    """What the async workers use, as coroutines. Create with `await AsyncQueue.open(...)`,
    which creates the consumer groups."""

    def __init__(
        self, client: redis.asyncio.Redis, run: str, config: QueueConfig | None = None
    ) -> None:
        self.config = config or QueueConfig()
        self.keys = RunKeys(run)
        self._runner = AsyncRunner(client, self.config.redis_outage_s)

    @classmethod
    async def open(
        cls, client: redis.asyncio.Redis, run: str, config: QueueConfig | None = None
    ) -> AsyncQueue:
        queue = cls(client, run, config)
        await queue._runner.run(streams.ensure_groups(queue.keys))
        return queue

    async def publish(self, stream: str, group: RolloutGroup, counter: str | None = None) -> str:
        return await self._runner.run(streams.publish(self.keys, stream, group, counter))

    async def forward(
        self,
        source: str,
        message_id: str,
        target: str,
        group: RolloutGroup,
        counter: str,
        also: str | None = None,
    ) -> str | None:
        return await self._runner.run(
            streams.forward(self.keys, source, message_id, target, group, counter, also)
        )

    async def wait_for_room(
        self, poll_s: float = 0.2, should_stop: Callable[[], bool] | None = None
    ) -> None:
        await self._runner.run(
            streams.wait_for_room(self.keys, self.config.max_backlog, poll_s, should_stop)
        )

    async def consume(
        self,
        stream: str,
        consumer: str,
        count: int = 1,
        block_ms: int = 1000,
        reclaim: bool = True,
    ) -> list[Delivery]:
        return await self._runner.run(
            streams.consume(self.keys, self.config, stream, consumer, count, block_ms, reclaim)
        )

    async def dead_letter(self, stream: str, message_id: str, reason: str) -> None:
        await self._runner.run(streams.dead_letter(self.keys, stream, message_id, reason))

    async def prune_consumers(
        self, stream: str, keep: str, idle_ms: int = GONE_CONSUMER_MS
    ) -> list[str]:
        return await self._runner.run(streams.prune_consumers(self.keys, stream, idle_ms, keep))

    async def record_teacher_latency(self, latency_ms: float) -> None:
        await self._runner.run(state.record_teacher_latency(self.keys, latency_ms))

    async def trainer_version(self) -> int:
        return await self._runner.run(state.trainer_version(self.keys))

    async def claim_prompts(self, count: int) -> int:
        return await self._runner.run(state.claim_prompts(self.keys, count))


class QueueReader:
    """Read-only figures of a run; never creates a key."""

    def __init__(self, client: redis.Redis, run: str) -> None:
        self.keys = RunKeys(run)
        self._runner = Runner(client)

    def server_time_ms(self) -> int:
        return self._runner.run(readings.server_time_ms())

    def stream_lengths(self) -> dict[str, int]:
        return self._runner.run(readings.stream_lengths(self.keys))

    def groups_progress(self) -> list[GroupProgress]:
        return self._runner.run(readings.groups_progress(self.keys))

    def recent_dead(self, count: int) -> list[DeadLetterEntry]:
        return self._runner.run(readings.recent_dead(self.keys, count))

    def stats(self) -> dict[str, int]:
        return self._runner.run(state.stats(self.keys))

    def accounts(self) -> dict[str, int]:
        return self._runner.run(state.accounts(self.keys))

    def trainer_progress(self) -> TrainerProgress:
        return self._runner.run(state.trainer_progress(self.keys))

    def teacher_latencies(self) -> list[float]:
        return self._runner.run(state.teacher_latencies(self.keys))
