"""The one retry policy of the HTTP clients and the scorer: exponential backoff with
jitter (so that clients failing together do not retry together) between attempts that
raise the given transient error, until `stop`; any other error is raised at once.

    # A deadline that holds, retries included: no wait that would end past 30 s.
    policy = backoff(TransientError, stop_before_delay(30.0), initial_s=0.25, max_s=5.0, log=log)
    response = await policy(attempt, url)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
)
from tenacity.stop import StopBaseT

from services.common.backoff import jittered_exponential


class TransientError(Exception):
    """One attempt failed in a way the next may not: a server was unreachable, busy or
    (re)starting. `reason` says what happened, `url` which server, when there is one."""

    def __init__(self, reason: str, url: str = "") -> None:
        super().__init__(f"{url}: {reason}" if url else reason)
        self.reason, self.url = reason, url


def backoff(
    retry_on: type[BaseException],
    stop: StopBaseT,
    *,
    initial_s: float,
    max_s: float,
    log: logging.Logger,
    level: int = logging.WARNING,
) -> AsyncRetrying:
    """Waits `initial_s`, doubling up to `max_s`, each plus up to `initial_s` of random
    jitter. When `stop` says so, the last `retry_on` error is raised as is."""
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop,
        wait=jittered_exponential(initial_s, max_s),
        before_sleep=_log_retry(log, level),
        reraise=True,
    )


def _log_retry(log: logging.Logger, level: int) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.log(level, "%s; retrying in %.2fs", error, state.upcoming_sleep)

    return before_sleep
