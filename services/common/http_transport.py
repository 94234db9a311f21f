"""How an RLAD server is put on the network: uvicorn with a deadline on request headers,
and a warning when it is reachable from other hosts without a key.

uvicorn times out idle keep-alive connections but not a request whose headers never
finish: a client that opens connections and sends a few header bytes now and then holds
them (and their file descriptors) forever. `header_timeout_protocol` closes a connection
whose next request's headers are not complete `header_timeout_s` after its first byte (or
after the connection opened). Bodies have their own deadline (`read_body`, and the
rollout server's upload idle timeout).

A server with an `Announcer` (`rlad serve-* --register`) announces itself once it is
ready and every heartbeat after, and stops in three steps on its first SIGTERM: it says it
is draining (in the registry and on `/health`, 503) while it keeps serving, so that
clients send elsewhere; it finishes its requests in flight; it withdraws and exits.

    serve(create_app(config), config)                # what `rlad serve-*` runs
    serve(create_app(config), config, registration)  # ... with `--register`
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import Awaitable
from types import FrameType
from typing import Any, Protocol, cast

import uvicorn

from services.common.http_server import API_KEY_ENV, api_key
from services.common.protocol import ServerInfo

log = logging.getLogger(__name__)


class ServeSettings(Protocol):
    """What serving needs of a server's settings (`ServerConfig` has it all)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def log_level(self) -> str: ...

    @property
    def header_timeout_s(self) -> float: ...

    @property
    def loopback_only(self) -> bool: ...

    @property
    def drain_grace_s(self) -> float: ...

    @property
    def drain_timeout_s(self) -> float: ...


class _HeaderDeadline(asyncio.Protocol):
    """Mixed into uvicorn's HTTP protocol: one deadline for the headers of each request.

    Armed when the connection opens and when the first bytes arrive while no request is
    in progress; when it fires, the connection is closed unless a request's headers were
    completed since it was armed (uvicorn then starts a new request cycle).
    """

    header_timeout_s: float
    # Set by uvicorn's protocol classes (their own, more precise annotations win).
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    _deadline: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._armed_cycle = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self._request_in_progress() or self.transport.is_closing():
            return
        if self.cycle is self._armed_cycle:  # no request's headers completed in time
            self.transport.close()
        else:  # between requests again: the next headers get a deadline of their own
            self._arm()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and not self._request_in_progress():
            self._arm()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


def _uvicorn_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn would pick: httptools when installed, else h11."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def header_timeout_protocol(
    timeout_s: float, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (`base`, default: the one uvicorn picks) with a header
    deadline of `timeout_s`; pass it as uvicorn's `http`."""
    parent = base or _uvicorn_protocol()
    name = f"HeaderTimeout{parent.__name__}"
    return cast(
        type[asyncio.Protocol],
        type(name, (_HeaderDeadline, parent), {"header_timeout_s": timeout_s}),
    )


def warn_if_unprotected(settings: ServeSettings) -> None:
    """Say at start when any host that can reach the server may use it without a key."""
    if settings.loopback_only or api_key() is not None:
        return
    log.warning(
        "bound to %s without %s: every route except the rollout server's weight updates "
        "answers anyone who can reach this address (weight updates refuse all: they need "
        "the key off loopback). Set %s on the server and its clients, or bind to 127.0.0.1.",
        settings.host,
        API_KEY_ENV,
        API_KEY_ENV,
    )


class Announcer(Protocol):
    """Where a server announces itself while it serves (services.queue.registry's
    `Registration`): `announce` every `heartbeat_s` once it is ready, with `draining` once
    it stops; `withdraw` when it is gone."""

    heartbeat_s: float

    async def announce(self, info: ServerInfo, draining: bool) -> None: ...

    async def withdraw(self) -> None: ...


class _DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT starts a drain instead of the shutdown (`_drain`
    ends it); a second signal stops it at once, as plain uvicorn does."""

    drain_requested = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_requested or not self.started:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
        self.drain_requested = True


def serve(app: Any, settings: ServeSettings, announcer: Announcer | None = None) -> None:
    """Run `app` under uvicorn at `settings.host:port` until stopped; with an `announcer`,
    announce the server once it is ready and drain it on the first SIGTERM."""
    warn_if_unprotected(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=header_timeout_protocol(settings.header_timeout_s),
    )
    if announcer is None:
        uvicorn.Server(config).run()
        return
    asyncio.run(_serve_announced(_DrainingServer(config), app, settings, announcer))


async def _serve_announced(
    server: _DrainingServer, app: Any, settings: ServeSettings, announcer: Announcer
) -> None:
    serving = asyncio.create_task(server.serve())
    heartbeat: asyncio.Task[None] | None = None
    try:
        while not (server.started and app.state.is_ready()):
            if serving.done():
                return await serving  # it failed to start: its error, not a registration
            await asyncio.sleep(0.1)
        heartbeat = asyncio.create_task(_heartbeats(app, announcer))
        while not server.drain_requested and not serving.done():
            await asyncio.sleep(0.1)
        if server.drain_requested:
            await _drain(server, app, settings)
        # Heartbeats end first, or one could write the record again after it is withdrawn.
        await _cancel(heartbeat)
        await _quietly(announcer.withdraw(), "withdraw the registration")
        server.should_exit = True
        await serving
    finally:
        if heartbeat is not None and not heartbeat.done():  # an error on the way
            await _cancel(heartbeat)
            await _quietly(announcer.withdraw(), "withdraw the registration")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _heartbeats(app: Any, announcer: Announcer) -> None:
    """The record, now and every `heartbeat_s`: `draining` as soon as the server is."""
    while True:
        await _quietly(announcer.announce(app.state.info(), app.state.draining), "heartbeat")
        draining = app.state.draining
        deadline = time.monotonic() + announcer.heartbeat_s
        while time.monotonic() < deadline and app.state.draining == draining:
            await asyncio.sleep(0.05)


async def _drain(server: _DrainingServer, app: Any, settings: ServeSettings) -> None:
    """Say `draining` (registry and `/health`) and keep serving for `drain_grace_s`, so
    that every client has looked and sends nothing new; then wait for the requests in
    flight (up to `drain_timeout_s`)."""
    log.info("stopping: draining (clients are told to send elsewhere)")
    app.state.draining = True  # the next heartbeat, at once, says so
    deadline = time.monotonic() + settings.drain_timeout_s
    await asyncio.sleep(min(settings.drain_grace_s, settings.drain_timeout_s))
    while app.state.in_flight and time.monotonic() < deadline and not server.should_exit:
        await asyncio.sleep(0.05)
    if app.state.in_flight:
        log.warning("%d requests still in flight after the drain timeout", app.state.in_flight)


async def _quietly(call: Awaitable[None], what: str) -> None:
    """The registry is best effort: a server whose Redis is away keeps serving (its record
    then expires, and comes back with the next heartbeat that reaches Redis)."""
    try:
        await call
    except Exception as exc:
        log.warning("could not %s: %s", what, exc)
