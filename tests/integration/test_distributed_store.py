"""The trainer's rendezvous store takes unauthenticated connections: in a run on one node it
listens on the loopback address alone, never on every interface. The trainer's process
group set-up runs in a child process, whose listening sockets are then read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.common.runtime import free_port

SET_UP = """
import os, sys
from trainer.deepspeed_setup import init_distributed
init_distributed()
print("store port", os.environ["MASTER_PORT"], flush=True)
sys.stdin.read()
"""
LAUNCHER_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def listening(launcher_env: dict[str, str]) -> tuple[int, list[tuple[str, int]]]:
    """The store's port and every address the set-up process listens on."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env.update(launcher_env, DS_ACCELERATOR="cpu", PYTHONPATH=str(Path.cwd()))
    child = subprocess.Popen(
        [sys.executable, "-c", SET_UP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = "..."  # DeepSpeed prints to stdout too
        while line and not line.startswith("store port "):
            line = child.stdout.readline()
        assert line, child.communicate(timeout=30)[1][-3000:]
        sockets = psutil.Process(child.pid).net_connections(kind="inet")
        addresses = [(s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
        return int(line.split()[-1]), addresses
    finally:
        child.kill()
        child.communicate()


@pytest.mark.parametrize(
    "launcher_env",
    [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}],
    ids=["alone", "launcher-on-loopback"],
)
def test_the_store_of_a_one_node_run_listens_on_loopback_only(
    launcher_env: dict[str, str],
) -> None:
    if launcher_env:
        launcher_env = {**launcher_env, "MASTER_PORT": str(free_port())}
    port, addresses = listening(launcher_env)
    assert ("127.0.0.1", port) in addresses
    exposed = [a for a in addresses if a[0] not in ("127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
