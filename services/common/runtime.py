"""Process plumbing shared by every long-running command: logging set-up, a stop flag
raised by SIGINT/SIGTERM (so loops finish their current unit of work and exit cleanly),
and a free loopback port."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

from rich.logging import RichHandler


def configure_logging(name: str) -> None:
    level = os.environ.get("RLAD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"[{name}] %(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=True)],
        force=True,
    )
    # One line per HTTP request drowns the logs of long-running workers.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


class StopFlag:
    """Set on the first SIGINT/SIGTERM; call the instance to ask whether to stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _: FrameType | None) -> None:
        logging.getLogger(__name__).info("received %s, stopping", signal.Signals(signum).name)
        self.event.set()

    def __call__(self) -> bool:
        return self.event.is_set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
