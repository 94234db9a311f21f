"""The figures of `rlad monitor`: one read of Redis → one `QueueSnapshot`.

Everything comes from the queue's own keys (services/queue/streams.py), so the monitor needs no
connection to any process:

- stream lengths (`XLEN`); trimming keeps exactly the entries some group has not acknowledged;
- per consumer group: consumers, pending (delivered, not acknowledged), lag (in the stream,
  not yet delivered), and the age of the oldest entry the group still has to finish, taken
  from the millisecond part of that entry's id against the Redis server's clock;
- the run counters of `rlad:stats` (produced, scored, trained, stale, dead);
- the trainer's step, policy version and staleness histogram (`rlad:trainer`);
- the scorer's last teacher-call latencies (`rlad:teacher_latency_ms`), as p50 / p99;
- the newest dead letters with their reason.

Throughput needs two readings: `with_rates(previous, current)` turns counter differences
into groups per second (the live view does it between refreshes, `--once --window S` over
S seconds); a single reading reports counters only (`rates` is None). The same snapshot
feeds the terminal view (services/monitor/view.py) and the Prometheus exporter
(services/monitor/exporter.py).
"""

from __future__ import annotations

import math
from typing import Any

import redis
from pydantic import BaseModel, Field

from services.queue.streams import (
    CONSUMER_GROUPS,
    DEAD,
    ROLLOUTS,
    SCORED,
    STATS,
    TEACHER_LATENCY,
    TRAINER_STATE,
)

COUNTERS = ("produced", "scored", "trained", "stale", "dead")
STALENESS_PREFIX = "staleness_"
RECENT_DEAD = 5


class GroupState(BaseModel):
    stream: str = Field(description="Stream the consumer group reads.")
    group: str = Field(description="Consumer group name.")
    consumers: int = Field(description="Consumers registered in the group.")
    pending: int = Field(description="Delivered to a consumer, not yet acknowledged.")
    lag: int = Field(description="Entries in the stream not yet delivered to the group.")
    oldest_age_s: float | None = Field(
        description="Age of the oldest pending or undelivered entry; None when none waits."
    )


class LatencySummary(BaseModel):
    samples: int = Field(description="Teacher calls in the window (the scorer keeps 1000).")
    p50_ms: float | None = Field(description="Median latency of a scorer→teacher call.")
    p99_ms: float | None = Field(description="99th percentile (nearest rank).")


class TrainerState(BaseModel):
    step: int | None = Field(description="Last optimizer step the trainer published.")
    policy_version: int | None = Field(description="Policy version the trainer is at.")
    seconds_since_update: float | None = Field(description="Since the trainer last published.")
    staleness: dict[int, int] = Field(
        description="Groups consumed, by how many versions behind the trainer they were."
    )


class DeadLetter(BaseModel):
    id: str = Field(description="Entry id in rlad:dead.")
    source: str = Field(description="Stream the message was removed from.")
    reason: str = Field(description="Why it was dead-lettered.")


class QueueSnapshot(BaseModel):
    taken_at: float = Field(description="Redis server time of the reading (Unix seconds).")
    streams: dict[str, int] = Field(description="Length of each stream.")
    groups: list[GroupState] = Field(description="One entry per consumer group.")
    backlog: int = Field(description="Groups waiting for a scorer or the trainer (the bound).")
    counters: dict[str, int] = Field(description="Run counters from rlad:stats.")
    rates: dict[str, float] | None = Field(
        default=None, description="Counter growth in groups/s between two readings."
    )
    teacher_latency: LatencySummary
    trainer: TrainerState
    recent_dead: list[DeadLetter] = Field(description="Newest dead letters first.")

    def group(self, stream: str) -> GroupState:
        return next(g for g in self.groups if g.stream == stream)


def read_snapshot(client: redis.Redis) -> QueueSnapshot:
    """One consistent-enough reading of every figure (a handful of round trips)."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    streams = {name: int(client.xlen(name)) for name in (ROLLOUTS, SCORED, DEAD)}
    groups = [
        _group_state(client, stream, group, now_ms) for stream, group in CONSUMER_GROUPS.items()
    ]
    stats = {_text(k): int(v) for k, v in client.hgetall(STATS).items()}
    counters = {name: stats.get(name, 0) for name in COUNTERS}
    held = next(g.pending for g in groups if g.stream == SCORED)
    return QueueSnapshot(
        taken_at=now_ms / 1000,
        streams=streams,
        groups=groups,
        backlog=streams[ROLLOUTS] + streams[SCORED] - held,
        counters=counters,
        teacher_latency=_latency(client),
        trainer=_trainer(client, now_ms / 1000),
        recent_dead=_recent_dead(client),
    )


def with_rates(previous: QueueSnapshot, current: QueueSnapshot) -> QueueSnapshot:
    """`current` with groups/s per counter since `previous`."""
    elapsed = current.taken_at - previous.taken_at
    if elapsed <= 0:
        return current
    rates = {
        name: max(current.counters[name] - previous.counters.get(name, 0), 0) / elapsed
        for name in current.counters
    }
    return current.model_copy(update={"rates": rates})


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in (0, 1])."""
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def _group_state(client: redis.Redis, stream: str, group: str, now_ms: int) -> GroupState:
    info = _group_info(client, stream, group)
    if info is None:  # no consumer has attached yet: everything in the stream is lag
        first = client.xrange(stream, count=1)
        age = (now_ms - _id_ms(first[0][0])) / 1000 if first else None
        return GroupState(
            stream=stream,
            group=group,
            consumers=0,
            pending=0,
            lag=int(client.xlen(stream)),
            oldest_age_s=age,
        )
    last = _text(info["last-delivered-id"])
    undelivered = client.xrange(stream, min=f"({last}", max="+", count=1)
    lag = info.get("lag")
    if lag is None:  # Redis < 7 has no lag field, and 7.x reports None after deletions
        lag = len(client.xrange(stream, min=f"({last}", max="+") or [])
    candidates = []
    if int(info["pending"]):
        # The entries may be acknowledged between XINFO and XPENDING; the summary's min is
        # then None, and no pending entry has an age.
        oldest_pending = client.xpending(stream, group)["min"]
        if oldest_pending is not None:
            candidates.append(_id_ms(oldest_pending))
    if undelivered:
        candidates.append(_id_ms(undelivered[0][0]))
    oldest = (now_ms - min(candidates)) / 1000 if candidates else None
    return GroupState(
        stream=stream,
        group=group,
        consumers=int(info["consumers"]),
        pending=int(info["pending"]),
        lag=int(lag),
        oldest_age_s=max(oldest, 0.0) if oldest is not None else None,
    )


def _group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    try:
        rows = client.xinfo_groups(stream)
    except redis.ResponseError:  # the stream does not exist yet
        return None
    return next((row for row in rows if _text(row["name"]) == group), None)


def _latency(client: redis.Redis) -> LatencySummary:
    values = sorted(float(v) for v in client.lrange(TEACHER_LATENCY, 0, -1))
    if not values:
        return LatencySummary(samples=0, p50_ms=None, p99_ms=None)
    return LatencySummary(
        samples=len(values), p50_ms=percentile(values, 0.5), p99_ms=percentile(values, 0.99)
    )


def _trainer(client: redis.Redis, now: float) -> TrainerState:
    fields = {_text(k): _text(v) for k, v in client.hgetall(TRAINER_STATE).items()}
    staleness = {
        int(name.removeprefix(STALENESS_PREFIX)): int(value)
        for name, value in fields.items()
        if name.startswith(STALENESS_PREFIX)
    }
    updated = fields.get("updated_at")
    return TrainerState(
        step=int(fields["step"]) if "step" in fields else None,
        policy_version=int(fields["policy_version"]) if "policy_version" in fields else None,
        seconds_since_update=max(now - float(updated), 0.0) if updated else None,
        staleness=dict(sorted(staleness.items())),
    )


def _recent_dead(client: redis.Redis) -> list[DeadLetter]:
    letters = []
    for entry_id, fields in client.xrevrange(DEAD, count=RECENT_DEAD) or []:
        text = {_text(k): _text(v) for k, v in (fields or {}).items() if k != b"data"}
        letters.append(
            DeadLetter(
                id=_text(entry_id), source=text.get("source", "?"), reason=text.get("reason", "")
            )
        )
    return letters


def _id_ms(message_id: Any) -> int:
    return int(_text(message_id).partition("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
