"""Admission bounded by what requests cost, shared by both servers.

A server admits a request only while the work it holds (waiting and running) stays within
`capacity`, counted in the server's own unit of work: on the teacher, tokens as the engine
pays for them (padding included) plus the top-k entries it returns; on the rollout server,
prompt tokens plus n x the completion budget. Past it the answer is 429 with a
Retry-After: the excess divided by the throughput measured while the server was busy. A
request that alone costs more than `capacity` could never be admitted and gets 413.

    admission = Admission(capacity=262144, unit="tokens")
    with admission.hold(cost):      # 413 / 429 here, before any work is queued
        result = await do_the_work()
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from services.common.http_server import ApiError

# Throughput is measured over roughly this many recent seconds (an exponential half-life).
HALF_LIFE_S = 30.0
# Past a minute an estimate says little; clients ask again and get a fresher one.
MAX_RETRY_AFTER_S = 60


class Admission:
    def __init__(self, capacity: int, unit: str) -> None:
        self.capacity = capacity
        self.unit = unit
        self.admitted = 0  # cost of the requests held now
        self.requests = 0
        # Completed work and busy seconds, both decayed with the same half-life: their
        # ratio is the throughput while busy, whatever the concurrency.
        self._work = 0.0
        self._busy_s = 0.0
        self._last = time.monotonic()

    def _advance(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        decay = 0.5 ** (elapsed / HALF_LIFE_S)
        self._work *= decay
        self._busy_s = self._busy_s * decay + (elapsed if self.admitted else 0.0)

    @property
    def throughput(self) -> float:
        """Work completed per second while busy; 0 until something completed."""
        return self._work / self._busy_s if self._busy_s > 0 else 0.0

    def retry_after_s(self, cost: int) -> int:
        """Seconds until, at the measured throughput, `cost` more would fit."""
        excess = self.admitted + cost - self.capacity
        rate = self.throughput
        if excess <= 0 or rate <= 0:
            return 1
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / rate)))

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        """Hold `cost` of the capacity while the body runs; 413 or 429 when it cannot."""
        if cost > self.capacity:
            raise ApiError(
                413,
                "too_large",
                f"this request is {cost} {self.unit} of work, over the server's whole "
                f"admission bound ({self.capacity}); split it into smaller requests",
            )
        self._advance()
        if self.admitted + cost > self.capacity:
            retry = self.retry_after_s(cost)
            raise ApiError(
                429,
                "overloaded",
                f"the server holds {self.admitted} {self.unit} of work (limit "
                f"{self.capacity}); this request needs {cost}: retry in {retry}s or use "
                "another replica",
                headers={"Retry-After": str(retry)},
            )
        self.admitted += cost
        self.requests += 1
        completed = False
        try:
            yield
            completed = True
        finally:
            self._advance()
            self.admitted -= cost
            self.requests -= 1
            if completed:
                self._work += cost
