"""Every Redis key of a run, and the consumer group that reads each stream.

All keys start with `rlad:`, so `RUN_KEYS` matches the whole state of a run.
"""

from __future__ import annotations

ROLLOUTS = "rlad:rollouts"  # stream: rollout worker → scorers
SCORED = "rlad:scored"  # stream: scorers → trainer
DEAD = "rlad:dead"  # stream: dead letters, with their source and reason
STATS = "rlad:stats"  # hash: run counters (produced, scored, trained, stale, dead)
TRAINER_STATE = "rlad:trainer"  # hash: step, policy version, staleness histogram
TEACHER_LATENCY = "rlad:teacher_latency_ms"  # list: the scorer's latest teacher calls
RUN_KEYS = "rlad:*"

SCORERS = "scorers"
TRAINERS = "trainers"
CONSUMER_GROUPS = {ROLLOUTS: SCORERS, SCORED: TRAINERS}
STREAMS = (ROLLOUTS, SCORED, DEAD)
