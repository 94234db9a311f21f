"""A child started by `ManagedProcess` dies with its parent, however the parent died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# The parent starts a long-sleeping child as `rlad up` starts a server, prints its pid and
# waits to be killed.
PARENT = """
import sys, time
from pathlib import Path
from services.launch.processes import ManagedProcess
child = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                       Path(sys.argv[1])).start()
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it has exited all the same.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux-only")
def test_child_is_stopped_when_the_parent_is_killed(tmp_path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log")], stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel can act
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(child_pid):
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived its SIGKILLed parent")
