"""The figures of `rlad monitor`: one read of a run's keys in Redis → one `QueueSnapshot`.

Everything comes from the run's own keys, read through `QueueReader`
(services/queue/queues.py), so the monitor needs no connection to any process:

- stream lengths (`XLEN`); trimming keeps exactly the entries some group has not acknowledged;
- per consumer group: consumers, pending (delivered, not acknowledged), lag (in the stream,
  not yet delivered), and the age of the oldest entry the group still has to finish, taken
  from the millisecond part of that entry's id against the Redis server's clock;
- the run counters (produced, scored, trained, stale, dead, replayed, and of the scored
  groups those forwarded unscored: skipped_zero_variance, degraded_groups);
- the groups each teacher pool scored (`default` where the run has one teacher);
- the trainer's step, policy version and staleness histogram;
- the scorers' last teacher-call latencies, as p50 / p99;
- the newest dead letters with their reason.

Throughput needs two readings: `with_rates(previous, current)` turns counter differences
into groups per second (the live view does it between refreshes, `--once --window S` over
S seconds); a single reading reports counters only (`rates` is None). The same snapshot
feeds the terminal view (services/monitor/view.py) and the Prometheus exporter
(services/monitor/exporter.py).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import QueueReader
from services.queue.readings import GroupProgress
from services.queue.state import TrainerProgress, pool_counts

COUNTERS = (
    "produced",
    "scored",
    "trained",
    "stale",
    "dead",
    "replayed",
    "skipped_zero_variance",  # forwarded unscored: all rewards equal (part of `scored`)
    "degraded_groups",  # forwarded unscored: no teacher answered (part of `scored`)
)
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
    id: str = Field(description="Entry id in the dead letters (`rlad dead replay ID`).")
    source: str = Field(description="Stream the message was removed from.")
    reason: str = Field(description="Why it was dead-lettered.")


class QueueSnapshot(BaseModel):
    run: str = Field(description="The run read (its keys are rlad:<run>:*).")
    taken_at: float = Field(description="Redis server time of the reading (Unix seconds).")
    streams: dict[str, int] = Field(description="Length of each stream.")
    groups: list[GroupState] = Field(description="One entry per consumer group.")
    backlog: int = Field(
        description="Groups that await a scorer or the trainer (what queue.max_backlog bounds)."
    )
    counters: dict[str, int] = Field(description="The run counters.")
    teacher_pools: dict[str, int] = Field(
        default_factory=dict,
        description="Groups scored by each teacher pool (`default`: a run's one teacher).",
    )
    rates: dict[str, float] | None = Field(
        default=None, description="Counter growth in groups/s between two readings."
    )
    teacher_latency: LatencySummary
    trainer: TrainerState
    recent_dead: list[DeadLetter] = Field(description="Newest dead letters first.")

    def group(self, stream: str) -> GroupState:
        return next(g for g in self.groups if g.stream == stream)


def read_snapshot(reader: QueueReader) -> QueueSnapshot:
    """One consistent-enough reading of every figure (a handful of round trips)."""
    now_ms = reader.server_time_ms()
    streams = reader.stream_lengths()
    progress = reader.groups_progress()
    groups = [_group_state(p, now_ms) for p in progress]
    stats = reader.stats()
    return QueueSnapshot(
        run=reader.keys.run,
        taken_at=now_ms / 1000,
        streams=streams,
        groups=groups,
        backlog=_backlog(progress),
        counters={name: stats.get(name, 0) for name in COUNTERS},
        teacher_pools=pool_counts(stats),
        teacher_latency=_latency(sorted(reader.teacher_latencies())),
        trainer=_trainer(reader.trainer_progress(), now_ms / 1000),
        recent_dead=[
            DeadLetter(id=d.id, source=d.source, reason=d.reason)
            for d in reader.recent_dead(RECENT_DEAD)
        ],
    )


def _backlog(progress: list[GroupProgress]) -> int:
    """As the producers count it (services/queue/streams.py `backlog`): undelivered or
    being scored in rollouts, undelivered in scored (the trainer's held groups do not
    count)."""
    by_stream = {p.stream: p for p in progress}
    rollouts, scored = by_stream[ROLLOUTS], by_stream[SCORED]
    return rollouts.lag + rollouts.pending + scored.lag


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


def _group_state(progress: GroupProgress, now_ms: int) -> GroupState:
    oldest = progress.oldest_ms
    return GroupState(
        stream=progress.stream,
        group=progress.group,
        consumers=progress.consumers,
        pending=progress.pending,
        lag=progress.lag,
        oldest_age_s=max((now_ms - oldest) / 1000, 0.0) if oldest is not None else None,
    )


def _trainer(progress: TrainerProgress, now: float) -> TrainerState:
    updated = progress.updated_at
    return TrainerState(
        step=progress.step,
        policy_version=progress.policy_version,
        seconds_since_update=max(now - updated, 0.0) if updated is not None else None,
        staleness=progress.staleness,
    )


def _latency(values: list[float]) -> LatencySummary:
    if not values:
        return LatencySummary(samples=0, p50_ms=None, p99_ms=None)
    return LatencySummary(
        samples=len(values), p50_ms=percentile(values, 0.5), p99_ms=percentile(values, 0.99)
    )
