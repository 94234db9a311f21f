"""Helpers for tests that drive real processes."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.launch.processes import ManagedProcess


def wait_for(condition: Callable[[], bool], timeout_s: float, proc: ManagedProcess) -> None:
    """Poll `condition` while `proc` stays alive; fail with its log tail on timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        proc.check_alive()
        assert time.monotonic() < deadline, f"timed out; log:\n{proc.tail()}"
        time.sleep(0.2)
