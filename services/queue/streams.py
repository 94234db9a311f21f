"""Redis Streams queue of prompt groups, with at-least-once delivery
(docs/design.md#queue-semantics).

Streams (services/queue/keys.py): rollouts (rollout worker → scorers), scored (scorers →
trainer) and dead (dead letters with their source and reason). Each consumer stage is a
consumer group, so several scorers share one stream and a dead consumer's pending messages
are reclaimed (XPENDING with IDLE, then XCLAIM). A message is acknowledged only after the
work that used it is durable; one that keeps failing (delivered more than `max_deliveries`
times) moves to the dead letters. Trimming only removes entries that every consumer group
has delivered and acknowledged.

Every operation here is `Steps` (services/queue/runner.py) on one run's keys; `GroupQueue`
and `AsyncQueue` (services/queue/queues.py) run the same ones, blocking or on an event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import redis

from services.common import wire
from services.common.protocol import RolloutGroup
from services.config.workers import QueueConfig
from services.queue.keys import CONSUMER_GROUPS, DEAD, ROLLOUTS, SCORED, RunKeys
from services.queue.runner import Pause, Script, Steps, command, text

log = logging.getLogger(__name__)

STUCK_WARNING_S = 60.0  # a producer waiting this long for room says why, again and again


@dataclass
class Delivery:
    message_id: str
    group: RolloutGroup | None  # None when the payload could not be decoded
    deliveries: int
    error: str = ""  # why the payload could not be decoded


def ensure_groups(keys: RunKeys) -> Steps[None]:
    """Create each stream with its consumer group (idempotent)."""
    for stream, group in CONSUMER_GROUPS.items():
        try:
            yield command("xgroup_create", keys.stream(stream), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


# ---------------------------------------------------------------- producing


def publish(keys: RunKeys, stream: str, group: RolloutGroup, counter: str | None) -> Steps[str]:
    """Append a group; `counter` is incremented atomically with it."""
    new_id = yield Script(
        "publish", [keys.stream(stream), keys.stats], [wire.encode(group), counter or ""]
    )
    return text(new_id)


def forward(
    keys: RunKeys,
    source: str,
    message_id: str,
    target: str,
    group: RolloutGroup,
    counter: str,
    also: str | None = None,
) -> Steps[str | None]:
    """Acknowledge the source message and publish the processed group atomically, growing
    `counter` and, when given, `also` (how the group was processed) with it.

    Only the consumer whose acknowledgement succeeds publishes, so a message that was
    reclaimed and processed twice is still forwarded once. Returns the new id, or None
    when another consumer already forwarded it.
    """
    new_id = yield Script(
        "forward",
        [keys.stream(source), keys.stream(target), keys.stats],
        [CONSUMER_GROUPS[source], message_id, wire.encode(group), counter, also or ""],
    )
    yield from trim(keys, source)
    return text(new_id) if new_id else None


def backlog(keys: RunKeys, limit: int) -> Steps[int]:
    """Groups that await a consumer, counted up to `limit`: those not yet delivered to a
    scorer or being scored, and those scored but not yet delivered to the trainer.

    Neither the groups the trainer holds until its next checkpoint nor the acknowledged
    entries that stay in a stream behind them (they cannot be trimmed past the oldest held
    one) count: counting them stalls producers for good once they outnumber `limit`."""
    rollouts = yield from _group_info(keys, ROLLOUTS)
    scored = yield from _group_info(keys, SCORED)
    waiting = int(rollouts["pending"])  # being scored
    for stream, info in ((ROLLOUTS, rollouts), (SCORED, scored)):
        undelivered = yield command(
            "xrange",
            keys.stream(stream),
            min=f"({text(info['last-delivered-id'])}",
            max="+",
            count=max(limit - waiting, 0) + 1,
        )
        waiting += len(undelivered or [])
    return min(waiting, limit)


def _group_info(keys: RunKeys, stream: str) -> Steps[dict[str, Any]]:
    rows = yield command("xinfo_groups", keys.stream(stream))
    group = CONSUMER_GROUPS[stream]
    return next(row for row in rows if text(row["name"]) == group)


def wait_for_room(
    keys: RunKeys, max_backlog: int, poll_s: float, should_stop: Callable[[], bool] | None
) -> Steps[None]:
    """Wait while `max_backlog` groups await a consumer (backpressure on producers); say so
    when the wait lasts, since a run whose consumers are gone waits here forever."""
    started = warned = time.monotonic()
    while (waiting := (yield from backlog(keys, max_backlog))) >= max_backlog:
        if should_stop is not None and should_stop():
            return
        if time.monotonic() - warned >= STUCK_WARNING_S:
            warned = time.monotonic()
            log.warning(
                "waiting %.0f s for room: %d groups await a scorer or the trainer "
                "(queue.max_backlog %d) and none was consumed; check that the scorers and "
                "the trainer are running (`rlad monitor`)",
                warned - started,
                waiting,
                max_backlog,
            )
        yield Pause(poll_s)


# ---------------------------------------------------------------- consuming


def consume(
    keys: RunKeys,
    config: QueueConfig,
    stream: str,
    consumer: str,
    count: int,
    block_ms: int,
    reclaim: bool,
    holding: Collection[str] = (),
) -> Steps[list[Delivery]]:
    """Reclaimed stale pending messages first (unless `reclaim` is off: a consumer that
    holds messages until a checkpoint must not take its own back), then new ones; poison
    goes to the dead letters. `holding`: ids this consumer is still working on, never
    reclaimed (see `_reclaim`)."""
    key, group = keys.stream(stream), CONSUMER_GROUPS[stream]
    entries: list[Any] = []
    if reclaim:
        entries = yield from _reclaim(keys, config, stream, consumer, count, holding)
    if not entries:
        fresh = yield command(
            "xreadgroup", group, consumer, {key: ">"}, count=count, block=block_ms
        )
        entries = fresh[0][1] if fresh else []
    deliveries = yield from _deliveries(keys, stream, entries)
    return (yield from _live(keys, config, stream, deliveries))


def _reclaim(
    keys: RunKeys,
    config: QueueConfig,
    stream: str,
    consumer: str,
    count: int,
    holding: Collection[str],
) -> Steps[list[Any]]:
    """Up to `count` messages pending for `claim_idle_ms` or more, taken over by
    `consumer`, except those in `holding`: a consumer that works on several batches at
    once must not take back its own slow one, which would count as one more delivery
    (and end in the dead letters after `max_deliveries`) while it is still being worked
    on. XCLAIM checks the idle time again, so of two consumers reclaiming the same
    message only one gets it."""
    key, group = keys.stream(stream), CONSUMER_GROUPS[stream]
    rows = yield command(
        "xpending_range", key, group, "-", "+", count + len(holding), idle=config.claim_idle_ms
    )
    stale = [text(row["message_id"]) for row in rows if text(row["message_id"]) not in holding]
    if not stale:
        return []
    claimed = yield command("xclaim", key, group, consumer, config.claim_idle_ms, stale[:count])
    return list(claimed)


def _live(
    keys: RunKeys, config: QueueConfig, stream: str, deliveries: list[Delivery]
) -> Steps[list[Delivery]]:
    """The deliveries worth processing; the undecodable and the too-often-delivered are
    dead-lettered with their reason."""
    live = []
    for delivery in deliveries:
        if delivery.group is None:
            reason = f"payload could not be decoded: {delivery.error}"
            yield from dead_letter(keys, stream, delivery.message_id, reason)
        elif delivery.deliveries > config.max_deliveries:
            reason = f"delivered {delivery.deliveries} times without being acknowledged"
            yield from dead_letter(keys, stream, delivery.message_id, reason)
        else:
            live.append(delivery)
    return live


def _deliveries(keys: RunKeys, stream: str, entries: list[Any]) -> Steps[list[Delivery]]:
    """Decode entries and look up how often each was delivered."""
    key, group = keys.stream(stream), CONSUMER_GROUPS[stream]
    deliveries = []
    for entry in filter(None, entries):
        message_id, fields = text(entry[0]), entry[1]
        info = yield command("xpending_range", key, group, message_id, message_id, 1)
        times = int(info[0]["times_delivered"]) if info else 1
        try:
            deliveries.append(
                Delivery(message_id, wire.decode(fields[b"data"], RolloutGroup), times)
            )
        except Exception as exc:  # any malformed payload is dead-lettered, never retried
            log.error("undecodable message %s on %s: %s", message_id, key, exc)
            deliveries.append(Delivery(message_id, None, times, error=wire.describe_invalid(exc)))
    return deliveries


def pending_for(keys: RunKeys, stream: str, consumer: str) -> Steps[list[str]]:
    """Ids delivered to `consumer` and not yet acknowledged (used on resume)."""
    rows = yield command(
        "xpending_range",
        keys.stream(stream),
        CONSUMER_GROUPS[stream],
        "-",
        "+",
        10_000,
        consumername=consumer,
    )
    return [text(row["message_id"]) for row in rows]


def claim(
    keys: RunKeys, config: QueueConfig, stream: str, consumer: str, message_ids: list[str]
) -> Steps[list[Delivery]]:
    """Take over specific pending messages (a restarted consumer re-reading its own). Each
    claim counts as a delivery, so a message that crashes its consumer every time ends in
    the dead letters instead of crashing it for ever."""
    if not message_ids:
        return []
    entries = yield command(
        "xclaim", keys.stream(stream), CONSUMER_GROUPS[stream], consumer, 0, list(message_ids)
    )
    deliveries = yield from _deliveries(keys, stream, entries)
    return (yield from _live(keys, config, stream, deliveries))


def ack(keys: RunKeys, stream: str, message_ids: list[str], counter: str | None) -> Steps[int]:
    """Acknowledge; `counter` grows by the number actually acknowledged (atomically)."""
    if not message_ids:
        return 0
    acked = yield Script(
        "ack",
        [keys.stream(stream), keys.stats],
        [CONSUMER_GROUPS[stream], counter or "", *message_ids],
    )
    yield from trim(keys, stream)
    return int(acked)


def dead_letter(keys: RunKeys, stream: str, message_id: str, reason: str) -> Steps[None]:
    """Move a message to the dead letters with its reason (acknowledged and counted
    atomically; a message another consumer already finished is left alone)."""
    parked = yield Script(
        "dead_letter",
        [keys.stream(stream), keys.stream(DEAD), keys.stats],
        [CONSUMER_GROUPS[stream], message_id, reason, stream],
    )
    yield from trim(keys, stream)
    if parked:
        log.warning("dead-lettered %s from %s: %s", message_id, stream, reason)


def replay(keys: RunKeys, dead_ids: list[str]) -> Steps[list[str]]:
    """Put dead letters back on the stream they came from (`rlad dead replay`); returns the
    ids of those replayed (an id that is not a dead letter is skipped)."""
    sources = list(CONSUMER_GROUPS)
    replayed = []
    for dead_id in dead_ids:
        new_id = yield Script(
            "replay",
            [keys.stream(DEAD), keys.stats, *(keys.stream(s) for s in sources)],
            [dead_id, *sources],
        )
        if new_id:
            replayed.append(dead_id)
    return replayed


def prune_consumers(keys: RunKeys, stream: str, idle_ms: int, keep: str) -> Steps[list[str]]:
    """Forget the consumers (other than `keep`) idle for `idle_ms` that hold no message:
    those of processes that died, whose pending messages were reclaimed by others."""
    key, group = keys.stream(stream), CONSUMER_GROUPS[stream]
    pruned = []
    for consumer in (yield command("xinfo_consumers", key, group)):
        name = text(consumer["name"])
        if name == keep or int(consumer["idle"]) < idle_ms:
            continue
        if (yield Script("prune_consumer", [key], [group, name])):
            pruned.append(name)
    return pruned


def trim(keys: RunKeys, stream: str) -> Steps[None]:
    """Drop only entries that every consumer group has delivered and acknowledged."""
    key = keys.stream(stream)
    floor = None
    for info in (yield command("xinfo_groups", key)):
        summary = yield command("xpending", key, text(info["name"]))
        if summary["pending"]:
            bound = text(summary["min"])
        else:
            bound = _next_id(text(info["last-delivered-id"]))
        floor = bound if floor is None else min(floor, bound, key=_id_key)
    if floor is not None:
        yield command("xtrim", key, minid=floor, approximate=False)


def _id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(message_id: str) -> str:
    ms, seq = _id_key(message_id)
    return f"{ms}-{seq + 1}"
