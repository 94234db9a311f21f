"""The one backoff shape of the project: waits that double from `initial_s` up to `max_s`,
each plus up to `initial_s` of random jitter, so that processes failing together (the
clients of a dead teacher, every process of a run when Redis restarts) do not retry
together. The HTTP clients' policy (services/clients/retry.py) and the queue's Redis
outage policy (services/queue/runner.py) both wait this way."""

from __future__ import annotations

from tenacity import wait_exponential, wait_random
from tenacity.wait import wait_base


def jittered_exponential(initial_s: float, max_s: float) -> wait_base:
    # wait_exponential_jitter would do, but recent tenacity releases deprecate its `initial`
    return wait_exponential(multiplier=initial_s, max=max_s) + wait_random(0, initial_s)
