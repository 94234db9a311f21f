"""Run-wide state beside the streams: the run counters (produced, scored, trained, stale,
dead, replayed, skipped_zero_variance, degraded_groups, and the groups each teacher pool
scored), the trainer's progress (step, policy version and the staleness
histogram of the groups it consumed), the scorer's latest teacher-call latencies and the
prompt cursor (the next position of the run's seeded prompt stream, shared by every
rollout worker). `rlad monitor`, `rlad up` and the accounting tests read these as the one
source of truth. Every operation is `Steps` (services/queue/runner.py).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from services.common import wire
from services.queue.keys import CONSUMER_GROUPS, ROLLOUTS, RUNS_PATTERN, SCORED, RunKeys, run_of
from services.queue.readings import group_progress
from services.queue.runner import Script, Steps, command, text

LATENCY_SAMPLES = 1000
STALENESS_PREFIX = "staleness_"
POOL_PREFIX = "scored_by_pool:"  # a run counter per teacher pool (`default`: the one teacher)


def scored_by_pool(pool: str) -> str:
    """The run counter of the groups teacher pool `pool` scored."""
    return f"{POOL_PREFIX}{pool}"


def pool_counts(counters: dict[str, int]) -> dict[str, int]:
    """The groups each teacher pool scored, by pool name, from the run counters."""
    return {
        name.removeprefix(POOL_PREFIX): value
        for name, value in sorted(counters.items())
        if name.startswith(POOL_PREFIX)
    }


@dataclass
class TrainerProgress:
    step: int | None
    policy_version: int | None
    updated_at: float | None  # Unix seconds
    staleness: dict[int, int]  # groups consumed, by how many versions behind they were


def stats(keys: RunKeys) -> Steps[dict[str, int]]:
    counters = yield command("hgetall", keys.stats)
    return {text(name): int(value) for name, value in counters.items()}


def accounts(keys: RunKeys) -> Steps[dict[str, int]]:
    """Counters plus what is still queued (delivered and not acknowledged, or not delivered
    yet): produced = trained + stale + dead + in queue, at any moment. Not the streams'
    lengths: acknowledged entries stay behind an older pending one until it is trimmed."""
    result = yield from stats(keys)
    for stream, name in ((ROLLOUTS, "in_rollouts"), (SCORED, "in_scored")):
        progress = yield from group_progress(keys, stream, CONSUMER_GROUPS[stream])
        result[name] = progress.pending + progress.lag
    return result


def record_teacher_latency(keys: RunKeys, latency_ms: float) -> Steps[None]:
    """Keep the latest `LATENCY_SAMPLES` scorer→teacher call latencies."""
    yield Script("record_latency", [keys.teacher_latency], [round(latency_ms, 2), LATENCY_SAMPLES])


def teacher_latencies(keys: RunKeys) -> Steps[list[float]]:
    values = yield command("lrange", keys.teacher_latency, 0, -1)
    return [float(value) for value in values]


def trainer_version(keys: RunKeys) -> Steps[int]:
    """The policy version the trainer last published (0 before it has)."""
    version = yield command("hget", keys.trainer_state, "policy_version")
    return int(version or 0)


def publish_trainer_state(keys: RunKeys, step: int, policy_version: int) -> Steps[None]:
    state = {"step": step, "policy_version": policy_version, "updated_at": time.time()}
    yield command("hset", keys.trainer_state, mapping=state)


def count_staleness(keys: RunKeys, versions_behind: int) -> Steps[None]:
    """One more consumed group that was `versions_behind` the trainer's policy."""
    yield command("hincrby", keys.trainer_state, f"{STALENESS_PREFIX}{versions_behind}", 1)


def trainer_progress(keys: RunKeys) -> Steps[TrainerProgress]:
    raw = yield command("hgetall", keys.trainer_state)
    fields = {text(name): text(value) for name, value in raw.items()}
    staleness = {
        int(name.removeprefix(STALENESS_PREFIX)): int(value)
        for name, value in fields.items()
        if name.startswith(STALENESS_PREFIX)
    }
    return TrainerProgress(
        step=int(fields["step"]) if "step" in fields else None,
        policy_version=int(fields["policy_version"]) if "policy_version" in fields else None,
        updated_at=float(fields["updated_at"]) if "updated_at" in fields else None,
        staleness=dict(sorted(staleness.items())),
    )


def claim_prompts(keys: RunKeys, count: int) -> Steps[int]:
    """Take the next `count` positions of the prompt stream; returns the first. Atomic
    (INCRBY), so two workers never take the same position."""
    end = yield command("incrby", keys.prompt_cursor, count)
    return int(end) - count


def prompt_cursor(keys: RunKeys) -> Steps[int]:
    """The next position no worker has taken yet (0 before any)."""
    value = yield command("get", keys.prompt_cursor)
    return int(value or 0)


def restore_prompt_cursor(keys: RunKeys, position: int) -> Steps[int]:
    """Move the cursor up to `position` (a resumed checkpoint's), never back: positions
    above it taken since are in the streams, if this Redis kept them, and must not be
    generated twice. Returns the cursor now."""
    return int((yield Script("raise_to", [keys.prompt_cursor], [position])))


def prompt_low_water(keys: RunKeys, trained: Collection[str] = ()) -> Steps[int]:
    """Where a resume would continue the prompt stream so that no prompt still in the
    queue is skipped: the lowest position of any group in the two streams (trimmed to
    their oldest unacknowledged entry, so acknowledged ones may lower it too) except the
    `trained` ones (`scored` ids a checkpoint contains), or the cursor when none is left."""
    lowest = yield from prompt_cursor(keys)
    for stream in (ROLLOUTS, SCORED):
        for message_id, fields in (yield command("xrange", keys.stream(stream))) or []:
            if stream == SCORED and text(message_id) in trained:
                continue
            try:
                position = wire.decode_raw(fields[b"data"]).get("prompt_index")
            except (wire.WireDecodeError, KeyError, AttributeError):
                continue  # a payload no worker can read has no position either
            if isinstance(position, int):
                lowest = min(lowest, position)
    return lowest


def clear_run(keys: RunKeys) -> Steps[int]:
    """Delete every key of this run (a fresh start); other runs' keys are never touched.
    Returns how many there were."""
    found = yield from _scan(keys.pattern)
    if found:
        yield command("delete", *found)
    return len(found)


def run_names() -> Steps[list[str]]:
    """The runs that have a queue on this Redis."""
    return sorted(run_of(text(key)) for key in (yield from _scan(RUNS_PATTERN)))


def _scan(pattern: str) -> Steps[list[bytes]]:
    keys: list[bytes] = []
    cursor = 0
    while True:
        cursor, batch = yield command("scan", cursor, match=pattern)
        keys += batch
        if cursor == 0:  # SCAN has been round the whole keyspace
            return keys
