"""Redis Streams queue of prompt groups, with at-least-once delivery
(docs/design.md#queue-semantics).

Streams: `rlad:rollouts` (rollout worker → scorers), `rlad:scored` (scorers → trainer) and
`rlad:dead` (dead letters with their reason). Each consumer stage is a consumer group, so
several scorers share one stream and a dead consumer's pending messages are reclaimed with
XAUTOCLAIM. A message is acknowledged only after the work that used it is durable; one that
keeps failing (delivered more than `max_deliveries` times) moves to the dead-letter stream.
Trimming only removes entries that every consumer group has delivered and acknowledged.

Every operation here is `Steps` (services/queue/runner.py); `GroupQueue` and `AsyncQueue`
(services/queue/queues.py) run the same ones, blocking or on an event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from services.common import wire
from services.common.protocol import RolloutGroup
from services.config.workers import QueueConfig
from services.queue.keys import CONSUMER_GROUPS, DEAD, ROLLOUTS, SCORED, STATS, TRAINERS
from services.queue.runner import Pause, Script, Steps, command, text

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    message_id: str
    group: RolloutGroup | None  # None when the payload could not be decoded
    deliveries: int


def ensure_groups() -> Steps[None]:
    """Create each stream with its consumer group (idempotent)."""
    for stream, group in CONSUMER_GROUPS.items():
        try:
            yield command("xgroup_create", stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


# ---------------------------------------------------------------- producing


def publish(stream: str, group: RolloutGroup, counter: str | None) -> Steps[str]:
    """Append a group; `counter` is incremented atomically with it."""
    new_id = yield Script("publish", [stream, STATS], [wire.encode(group), counter or ""])
    return text(new_id)


def forward(
    source: str, message_id: str, target: str, group: RolloutGroup, counter: str
) -> Steps[str | None]:
    """Acknowledge the source message and publish the processed group atomically.

    Only the consumer whose acknowledgement succeeds publishes, so a message that was
    reclaimed and processed twice is still forwarded once. Returns the new id, or None
    when another consumer already forwarded it.
    """
    new_id = yield Script(
        "forward",
        [source, target, STATS],
        [CONSUMER_GROUPS[source], message_id, wire.encode(group), counter],
    )
    yield from trim(source)
    return text(new_id) if new_id else None


def backlog() -> Steps[int]:
    """Groups still waiting for a scorer or the trainer. Groups the trainer already
    trained on but holds pending until its next checkpoint do not count: they would
    otherwise stall producers whenever the bound is below one checkpoint interval."""
    held = yield command("xpending", SCORED, TRAINERS)
    rollouts = yield command("xlen", ROLLOUTS)
    scored = yield command("xlen", SCORED)
    return int(rollouts) + int(scored) - int(held["pending"])


def wait_for_room(
    max_backlog: int, poll_s: float, should_stop: Callable[[], bool] | None
) -> Steps[None]:
    """Wait while the backlog exceeds the bound (backpressure on producers)."""
    while (yield from backlog()) >= max_backlog:
        if should_stop is not None and should_stop():
            return
        yield Pause(poll_s)


# ---------------------------------------------------------------- consuming


def consume(
    config: QueueConfig, stream: str, consumer: str, count: int, block_ms: int, reclaim: bool
) -> Steps[list[Delivery]]:
    """Reclaimed stale pending messages first (unless `reclaim` is off: a consumer that
    holds messages until a checkpoint must not take its own back), then new ones; poison
    goes to rlad:dead."""
    group = CONSUMER_GROUPS[stream]
    entries: list[Any] = []
    if reclaim:
        reply = yield command(
            "xautoclaim", stream, group, consumer, min_idle_time=config.claim_idle_ms, count=count
        )
        entries = list(reply[1])  # Redis 7 adds a third element (deleted ids); 6.2 not
    if not entries:
        fresh = yield command(
            "xreadgroup", group, consumer, {stream: ">"}, count=count, block=block_ms
        )
        entries = fresh[0][1] if fresh else []
    deliveries = yield from _deliveries(stream, group, entries)
    live = []
    for delivery in deliveries:
        if delivery.group is None:
            yield from dead_letter(stream, delivery.message_id, "payload could not be decoded")
        elif delivery.deliveries > config.max_deliveries:
            reason = f"delivered {delivery.deliveries} times without being acknowledged"
            yield from dead_letter(stream, delivery.message_id, reason)
        else:
            live.append(delivery)
    return live


def _deliveries(stream: str, group: str, entries: list[Any]) -> Steps[list[Delivery]]:
    """Decode entries and look up how often each was delivered."""
    deliveries = []
    for entry in filter(None, entries):
        message_id, fields = text(entry[0]), entry[1]
        info = yield command("xpending_range", stream, group, message_id, message_id, 1)
        times = int(info[0]["times_delivered"]) if info else 1
        try:
            payload = wire.decode(fields[b"data"], RolloutGroup)
        except Exception as exc:  # any malformed payload is dead-lettered, never retried
            log.error("undecodable message %s on %s: %s", message_id, stream, exc)
            payload = None
        deliveries.append(Delivery(message_id, payload, times))
    return deliveries


def pending_for(stream: str, consumer: str) -> Steps[list[str]]:
    """Ids delivered to `consumer` and not yet acknowledged (used on resume)."""
    group = CONSUMER_GROUPS[stream]
    rows = yield command("xpending_range", stream, group, "-", "+", 10_000, consumername=consumer)
    return [text(row["message_id"]) for row in rows]


def claim(stream: str, consumer: str, message_ids: list[str]) -> Steps[list[Delivery]]:
    """Take over specific pending messages (a restarted consumer re-reading its own)."""
    if not message_ids:
        return []
    group = CONSUMER_GROUPS[stream]
    entries = yield command("xclaim", stream, group, consumer, 0, list(message_ids))
    return (yield from _deliveries(stream, group, entries))


def ack(stream: str, message_ids: list[str], counter: str | None) -> Steps[int]:
    """Acknowledge; `counter` grows by the number actually acknowledged (atomically)."""
    if not message_ids:
        return 0
    acked = yield Script(
        "ack", [stream, STATS], [CONSUMER_GROUPS[stream], counter or "", *message_ids]
    )
    yield from trim(stream)
    return int(acked)


def dead_letter(stream: str, message_id: str, reason: str) -> Steps[None]:
    """Move a message to rlad:dead with its reason (acknowledged and counted atomically)."""
    yield Script(
        "dead_letter", [stream, DEAD, STATS], [CONSUMER_GROUPS[stream], message_id, reason]
    )
    yield from trim(stream)
    log.warning("dead-lettered %s from %s: %s", message_id, stream, reason)


def trim(stream: str) -> Steps[None]:
    """Drop only entries that every consumer group has delivered and acknowledged."""
    floor = None
    for info in (yield command("xinfo_groups", stream)):
        summary = yield command("xpending", stream, text(info["name"]))
        if summary["pending"]:
            bound = text(summary["min"])
        else:
            bound = _next_id(text(info["last-delivered-id"]))
        floor = bound if floor is None else min(floor, bound, key=_id_key)
    if floor is not None:
        yield command("xtrim", stream, minid=floor, approximate=False)


def _id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(message_id: str) -> str:
    ms, seq = _id_key(message_id)
    return f"{ms}-{seq + 1}"
