"""Replica bookkeeping for `TeacherClient`: load, circuit breakers and health per server.

A replica's breaker opens after `breaker_failures` consecutive failures (or one failed
health check) and stays open for `breaker_open_s`; then one more failure reopens it at
once (half-open), one success closes it. An overloaded replica (429/503) is skipped for
its Retry-After without counting as broken.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.protocol import ScoreSequence

log = logging.getLogger(__name__)


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    failures: int = 0  # consecutive
    open_until: float = 0.0  # monotonic time; skipped before it
    down_by_health: bool = False
    last_failure: str = "never failed"

    def available(self, now: float) -> bool:
        return now >= self.open_until


class ReplicaSet:
    def __init__(self, urls: Sequence[str], breaker_failures: int, breaker_open_s: float) -> None:
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self.breaker_failures = breaker_failures
        self.breaker_open_s = breaker_open_s

    def set_urls(self, urls: Sequence[str]) -> tuple[list[str], list[str]]:
        """Serve `urls` from now on: a replica kept keeps its load and breaker, a new one
        starts fresh, a removed one is picked no more (requests it is answering go on, on
        their own reference to it). Returns the URLs added and removed."""
        wanted = list(dict.fromkeys(url.rstrip("/") for url in urls))
        known = {replica.url: replica for replica in self.replicas}
        added = [url for url in wanted if url not in known]
        removed = [url for url in known if url not in wanted]
        self.replicas = [known.get(url) or Replica(url) for url in wanted]
        return added, removed

    def pick(self, tried: set[str]) -> Replica | None:
        """Least outstanding requests among closed breakers, preferring untried replicas."""
        now = time.monotonic()
        ready = [r for r in self.replicas if r.available(now)]
        fresh = [r for r in ready if r.url not in tried] or ready
        if not fresh:
            return None
        least = min(r.outstanding for r in fresh)
        return random.choice([r for r in fresh if r.outstanding == least])

    def all_tried(self, tried: set[str]) -> bool:
        """Every replica that may be used now has had a go (time to back off)."""
        now = time.monotonic()
        return all(r.url in tried for r in self.replicas if r.available(now))

    def any_reachable(self) -> bool:
        """Some replica may answer now: its breaker is closed and its last health check
        passed. Costs no request."""
        now = time.monotonic()
        return any(r.available(now) and not r.down_by_health for r in self.replicas)

    def next_opening(self) -> float:
        """When the first breaker half-opens; with no replica, shortly (one may be added)."""
        return min((r.open_until for r in self.replicas), default=time.monotonic() + 0.2)

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0

    def failed(self, replica: Replica, reason: str) -> None:
        replica.last_failure = reason
        replica.failures += 1
        if replica.failures >= self.breaker_failures:
            replica.open_until = time.monotonic() + self.breaker_open_s
            log.warning(
                "teacher %s: breaker open for %.1fs: %s", replica.url, self.breaker_open_s, reason
            )

    def busy(self, replica: Replica, reason: str, seconds: float) -> None:
        replica.last_failure = reason
        replica.open_until = max(replica.open_until, time.monotonic() + seconds)

    def health(self, replica: Replica, healthy: bool, reason: str, hold_s: float) -> None:
        """A failed check takes the replica out; the next good one brings it back."""
        if healthy and replica.down_by_health:
            replica.down_by_health, replica.failures, replica.open_until = False, 0, 0.0
        elif not healthy:
            replica.down_by_health = True
            replica.last_failure = reason
            replica.open_until = time.monotonic() + max(self.breaker_open_s, hold_s)

    def describe(self) -> str:
        if not self.replicas:
            return "no teacher replica known (none registered?)"
        return "; ".join(f"{r.url}: {r.last_failure}" for r in self.replicas)


def split_batches(
    sequences: Sequence[ScoreSequence], max_tokens: int, max_sequences: int
) -> list[list[ScoreSequence]]:
    """Consecutive chunks of at most `max_tokens` tokens and `max_sequences` sequences."""
    chunks: list[list[ScoreSequence]] = []
    current: list[ScoreSequence] = []
    tokens = 0
    for seq in sequences:
        n = len(seq.token_ids)
        if current and (tokens + n > max_tokens or len(current) >= max_sequences):
            chunks.append(current)
            current, tokens = [], 0
        current.append(seq)
        tokens += n
    if current:
        chunks.append(current)
    return chunks
