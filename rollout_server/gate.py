"""`VersionGate`: generations share the weights, a weight update gets them alone.

A generation enters with `async with gate.reading() as version:` and holds that version
until it has produced its last token. An update enters `gate.writing(...)`: from that
moment new generations wait, the update waits for (or aborts) the ones in flight, swaps
the weights, and sets the new version before anyone can read again. So every response
is produced by exactly one version, which is the one it reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from services.common.http_server import ApiError


class VersionGate:
    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False  # an update holds (or is draining towards) the weights

    @property
    def in_flight(self) -> int:
        return self._readers

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[int]:
        """Wait out any pending update, then hold the current version until exit."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
            version = self.version
        try:
            yield version
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def writing(
        self,
        drain_timeout_s: float,
        abort_in_flight: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[None]:
        """Exclusive access: block new readers, abort or drain current ones, then yield.

        Updates queue behind each other. If the drain takes longer than `drain_timeout_s`
        the update fails with 504 and readers are let in again on the old weights.
        """
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._writer = True
        try:
            if abort_in_flight is not None and self._readers:
                await abort_in_flight()
            async with self._cond:
                try:
                    await asyncio.wait_for(
                        self._cond.wait_for(lambda: self._readers == 0), drain_timeout_s
                    )
                except TimeoutError:
                    raise ApiError(
                        504,
                        "update_timeout",
                        f"{self._readers} generations still running after {drain_timeout_s:.0f}s;"
                        " the old weights keep serving. Raise update_timeout_s or use "
                        "in_flight_policy='abort'.",
                    ) from None
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
