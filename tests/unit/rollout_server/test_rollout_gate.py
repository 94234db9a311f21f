"""The version gate: a pending update holds back new generations, drains (or aborts) the
running ones, and every generation reports the version it ran under."""

from __future__ import annotations

import asyncio

import pytest

from rollout_server.gate import VersionGate
from services.common.http_server import ApiError


def test_update_waits_for_running_generations_and_blocks_new_ones() -> None:
    async def scenario() -> list[str]:
        gate = VersionGate(version=3)
        events: list[str] = []
        release = asyncio.Event()

        async def generation(name: str, hold: asyncio.Event | None) -> None:
            async with gate.reading() as version:
                events.append(f"{name} starts on v{version}")
                if hold is not None:
                    await hold.wait()
                events.append(f"{name} ends on v{gate.version}")

        async def update() -> None:
            async with gate.writing(drain_timeout_s=5):
                events.append("update swaps")
                gate.version = 4

        first = asyncio.create_task(generation("a", release))
        await asyncio.sleep(0.01)
        updating = asyncio.create_task(update())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(generation("b", None))
        await asyncio.sleep(0.01)
        assert events == ["a starts on v3"]  # b waits behind the pending update
        release.set()
        await asyncio.gather(first, updating, second)
        return events

    assert asyncio.run(scenario()) == [
        "a starts on v3",
        "a ends on v3",
        "update swaps",
        "b starts on v4",
        "b ends on v4",
    ]


def test_abort_policy_calls_abort_then_drains() -> None:
    async def scenario() -> int:
        gate = VersionGate()
        stop = asyncio.Event()
        aborted = 0

        async def generation() -> None:
            async with gate.reading():
                await stop.wait()

        async def abort() -> None:
            nonlocal aborted
            aborted += 1
            stop.set()

        task = asyncio.create_task(generation())
        await asyncio.sleep(0.01)
        async with gate.writing(drain_timeout_s=5, abort_in_flight=abort):
            assert gate.in_flight == 0
        await task
        return aborted

    assert asyncio.run(scenario()) == 1


def test_drain_timeout_fails_the_update_and_reopens_the_gate() -> None:
    async def scenario() -> None:
        gate = VersionGate(version=1)
        stop = asyncio.Event()

        async def generation() -> int:
            async with gate.reading() as version:
                await stop.wait()
                return version

        task = asyncio.create_task(generation())
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as caught:
            async with gate.writing(drain_timeout_s=0.05):
                raise AssertionError("must not get the weights")
        assert caught.value.status == 504
        async with gate.reading() as version:  # serving goes on with the old version
            assert version == 1
        stop.set()
        assert await task == 1

    asyncio.run(scenario())
