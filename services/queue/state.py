"""Run-wide state beside the streams: the counters of `rlad:stats` (produced, scored,
trained, stale, dead), the trainer's progress in `rlad:trainer` (step, policy version and
the staleness histogram of the groups it consumed) and the scorer's latest teacher-call
latencies. `rlad monitor`, `rlad up` and the accounting tests read these as the one source
of truth. Every operation is `Steps` (services/queue/runner.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.queue.keys import ROLLOUTS, RUN_KEYS, SCORED, STATS, TEACHER_LATENCY, TRAINER_STATE
from services.queue.runner import Script, Steps, command, text

LATENCY_SAMPLES = 1000
STALENESS_PREFIX = "staleness_"


@dataclass
class TrainerProgress:
    step: int | None
    policy_version: int | None
    updated_at: float | None  # Unix seconds
    staleness: dict[int, int]  # groups consumed, by how many versions behind they were


def stats() -> Steps[dict[str, int]]:
    counters = yield command("hgetall", STATS)
    return {text(name): int(value) for name, value in counters.items()}


def accounts() -> Steps[dict[str, int]]:
    """Counters plus what is still in the streams: produced = trained + stale + dead + in queue."""
    result = yield from stats()
    result["in_rollouts"] = int((yield command("xlen", ROLLOUTS)))
    result["in_scored"] = int((yield command("xlen", SCORED)))
    return result


def record_teacher_latency(latency_ms: float) -> Steps[None]:
    """Keep the latest `LATENCY_SAMPLES` scorer→teacher call latencies."""
    yield Script("record_latency", [TEACHER_LATENCY], [round(latency_ms, 2), LATENCY_SAMPLES])


def teacher_latencies() -> Steps[list[float]]:
    values = yield command("lrange", TEACHER_LATENCY, 0, -1)
    return [float(value) for value in values]


def trainer_version() -> Steps[int]:
    """The policy version the trainer last published (0 before it has)."""
    version = yield command("hget", TRAINER_STATE, "policy_version")
    return int(version or 0)


def publish_trainer_state(step: int, policy_version: int) -> Steps[None]:
    state = {"step": step, "policy_version": policy_version, "updated_at": time.time()}
    yield command("hset", TRAINER_STATE, mapping=state)


def count_staleness(versions_behind: int) -> Steps[None]:
    """One more consumed group that was `versions_behind` the trainer's policy."""
    yield command("hincrby", TRAINER_STATE, f"{STALENESS_PREFIX}{versions_behind}", 1)


def trainer_progress() -> Steps[TrainerProgress]:
    raw = yield command("hgetall", TRAINER_STATE)
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


def clear_run() -> Steps[int]:
    """Delete every key of a previous run; returns how many there were."""
    keys: list[bytes] = []
    cursor = 0
    while True:
        cursor, batch = yield command("scan", cursor, match=RUN_KEYS)
        keys += batch
        if cursor == 0:  # SCAN has been round the whole keyspace
            break
    if keys:
        yield command("delete", *keys)
    return len(keys)
