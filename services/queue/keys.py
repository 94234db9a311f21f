"""Every Redis key of a run, and the consumer group that reads each stream.

Keys are scoped by run name (`rlad:<run>:rollouts`, ...), so that runs sharing one Redis
never see, trim or delete each other's groups. Callers name a stream by its logical name
(`ROLLOUTS`, `SCORED`, `DEAD`); the queue (services/queue/queues.py) holds the run's
`RunKeys` and turns that name into the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.config.run import RUN_NAME_PATTERN

ROLLOUTS = "rollouts"  # stream: rollout worker → scorers
SCORED = "scored"  # stream: scorers → trainer
DEAD = "dead"  # stream: dead letters, with their source stream and reason
STREAMS = (ROLLOUTS, SCORED, DEAD)

SCORERS = "scorers"
TRAINERS = "trainers"
CONSUMER_GROUPS = {ROLLOUTS: SCORERS, SCORED: TRAINERS}

PREFIX = "rlad"


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run."""

    run: str

    def __post_init__(self) -> None:
        if not re.fullmatch(RUN_NAME_PATTERN, self.run):
            # The name is part of every key and of the SCAN pattern that finds them.
            raise ValueError(f"run name {self.run!r} must match {RUN_NAME_PATTERN}")

    def stream(self, name: str) -> str:
        return f"{PREFIX}:{self.run}:{name}"

    @property
    def stats(self) -> str:  # hash: run counters (produced, scored, trained, stale, dead)
        return f"{PREFIX}:{self.run}:stats"

    @property
    def trainer_state(self) -> str:  # hash: step, policy version, staleness histogram
        return f"{PREFIX}:{self.run}:trainer"

    @property
    def teacher_latency(self) -> str:  # list: the scorers' latest teacher calls
        return f"{PREFIX}:{self.run}:teacher_latency_ms"

    def servers(self, role: str) -> str:  # sorted set: server URL -> expiry (Redis time, ms)
        return f"{PREFIX}:{self.run}:servers:{role}"

    def server_records(self, role: str) -> str:  # hash: server URL -> its `ServerRecord`
        return f"{PREFIX}:{self.run}:servers:{role}:records"

    @property
    def prompt_cursor(self) -> str:  # integer: the next index of the seeded prompt stream
        return f"{PREFIX}:{self.run}:prompt_cursor"

    @property
    def pattern(self) -> str:
        """Matches every key of this run and of no other."""
        return f"{PREFIX}:{self.run}:*"


# Every run that has opened a queue has a rollouts stream; this finds them all.
RUNS_PATTERN = f"{PREFIX}:*:{ROLLOUTS}"


def run_of(rollouts_key: str) -> str:
    """The run name in a key that `RUNS_PATTERN` matched."""
    return rollouts_key.removeprefix(f"{PREFIX}:").removesuffix(f":{ROLLOUTS}")
