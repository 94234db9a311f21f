"""What a run of bench/faults.py did, read from outside the stack: the queue's accounts of
every group (produced, trained, stale, dead, still in the streams, lost), the groups trained
twice by `trained_groups.jsonl` across trainer restarts, and one reading of both over time."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from services.queue.keys import SCORERS
from services.queue.queues import QueueReader
from trainer import checkpoint


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file that the trainer wrote, less one a kill cut short."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


@dataclass
class Accounts:
    produced: int
    scored: int
    trained: int
    stale: int
    dead: int
    dead_reasons: Counter[str]
    waiting: int  # in the streams: delivered and not acknowledged, or not delivered yet
    waiting_rollouts: int  # of which in rlad:rollouts

    @property
    def lost(self) -> int:
        return self.produced - self.trained - self.stale - self.dead - self.waiting

    def dead_by_reason(self) -> str:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in self.dead_reasons.most_common())
        return f"{self.dead} ({reasons})" if reasons else str(self.dead)


def read_accounts(reader: QueueReader) -> Accounts | None:
    """The run's accounts, or None while Redis cannot be read. Counters and streams are
    read until the counters did not move in between: every move of a group from one
    account to another changes a counter, so the figures then agree with each other."""
    try:
        for _ in range(20):
            counters = reader.stats()
            progress = reader.groups_progress()
            if reader.stats() != counters:
                continue
            dead = counters.get("dead", 0)
            reasons = Counter(d.reason for d in reader.recent_dead(dead)) if dead else Counter()
            return Accounts(
                produced=counters.get("produced", 0),
                scored=counters.get("scored", 0),
                trained=counters.get("trained", 0),
                stale=counters.get("stale", 0),
                dead=dead,
                dead_reasons=reasons,
                waiting=sum(p.pending + p.lag for p in progress),
                waiting_rollouts=sum(p.pending + p.lag for p in progress if p.group == SCORERS),
            )
    except redis.RedisError:
        pass
    return None


class TrainingAudit:
    """`trained_groups.jsonl` across trainer restarts. A resume restores the newest
    checkpoint, so the lines its predecessors wrote for later steps were rolled back."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "trained_groups.jsonl"
        self.latest = folder / "checkpoints" / checkpoint.LATEST
        self.restarts: list[tuple[int, int]] = []  # (bytes written before it, step restored)
        self.unreadable = 0  # lines of the last reading that were not JSON

    def trainer_restarting(self) -> int:
        """Call with the trainer dead, before it starts again: the step it will restore."""
        restored = 0
        if self.latest.exists():
            restored = checkpoint.Progress.model_validate_json(self.latest.read_text()).step
        written = self.path.stat().st_size if self.path.exists() else 0
        self.restarts.append((written, restored))
        return restored

    def surviving_steps(self) -> list[tuple[int, list[str]]]:
        """(step, groups) of every line that no resume rolled back."""
        data = self.path.read_bytes() if self.path.exists() else b""
        history: list[tuple[int, list[str]]] = []
        restarts = list(self.restarts)
        offset = 0
        self.unreadable = 0
        for raw in data.splitlines(keepends=True):
            while restarts and restarts[0][0] <= offset:
                restored = restarts.pop(0)[1]
                history = [(step, groups) for step, groups in history if step <= restored]
            offset += len(raw)
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:  # cut short by a kill mid-write
                self.unreadable += 1
                continue
            history.append((line["step"], line["groups"]))
        for _, restored in restarts:
            history = [(step, groups) for step, groups in history if step <= restored]
        return history

    def trained_twice(self) -> int:
        counts = Counter(g for _, groups in self.surviving_steps() for g in groups)
        return sum(1 for n in counts.values() if n > 1)


@dataclass
class Reading:
    at: float  # time.monotonic()
    steps_logged: int  # lines of metrics.jsonl, across restarts
    last_step: int | None
    accounts: Accounts | None

    def moved_past(self, before: Reading) -> bool:
        """Every stage moved since `before`: a group produced, one scored, a trainer step."""
        if self.accounts is None or before.accounts is None:
            return False
        return (
            self.steps_logged > before.steps_logged
            and self.accounts.produced > before.accounts.produced
            and self.accounts.scored > before.accounts.scored
        )

    def describe(self) -> str:
        step = f"step {self.last_step}" if self.last_step is not None else "no step yet"
        if self.accounts is None:
            return f"{step} · Redis unreachable"
        a = self.accounts
        return (
            f"{step} · produced {a.produced} scored {a.scored} trained {a.trained} "
            f"stale {a.stale} dead {a.dead} in streams {a.waiting}"
        )
