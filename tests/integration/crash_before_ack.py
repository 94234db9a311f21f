"""`rlad train` that dies the moment a rank would acknowledge the groups of a checkpoint
already on disk: the crash window between saving and acknowledging, made certain.

Run in place of `services.cli.main` (`python -m tests.integration.crash_before_ack train
...`, under torchrun for several ranks); the exit code is 3.
"""

from __future__ import annotations

import os

from services.cli.main import app
from services.queue.queues import GroupQueue

CRASH_EXIT_CODE = 3
_ack = GroupQueue.ack


def _crash_before_trained_ack(
    self: GroupQueue, stream: str, message_ids: list[str], counter: str | None = None
) -> int:
    if counter == "trained" and message_ids:
        os._exit(CRASH_EXIT_CODE)
    return _ack(self, stream, message_ids, counter)


if __name__ == "__main__":
    GroupQueue.ack = _crash_before_trained_ack  # type: ignore[method-assign]
    app()
