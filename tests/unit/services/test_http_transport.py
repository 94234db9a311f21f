"""The header deadline of `services.common.http_transport`, on both HTTP protocols uvicorn
may pick (h11, httptools): a request whose headers never finish is cut off, complete
requests and kept-alive connections are served as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common import http_transport
from tests.server_support import (
    ThreadedServer,
    raw_connection,
    read_response,
    seconds_until_closed,
)

TIMEOUT_S = 0.5


def protocol(name: str) -> type[asyncio.Protocol]:
    if name == "h11":
        return H11Protocol
    pytest.importorskip("httptools")  # optional: uvicorn falls back to h11 without it
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return HttpToolsProtocol


@pytest.fixture(params=["h11", "httptools"])
def url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    base = protocol(request.param)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    monkeypatch.setattr(http_transport, "_uvicorn_protocol", lambda: base)
    with ThreadedServer(app, TIMEOUT_S) as server:
        yield server.url


def test_headers_that_never_finish_are_cut_off(url: str) -> None:
    for head in [b"", b"GET /ping HTTP/1.1\r\nhost: x"]:
        with raw_connection(url, head) as sock:
            assert seconds_until_closed(sock) < TIMEOUT_S + 1


def test_a_kept_alive_connection_gets_a_fresh_deadline_per_request(url: str) -> None:
    with raw_connection(url, b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n") as sock:
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT_S * 0.8)  # past most of the first deadline, then a new request
        sock.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /ping HTTP/1.1\r\n")  # the third never finishes its headers
        began = time.monotonic()
        assert seconds_until_closed(sock) < TIMEOUT_S + 1
        assert time.monotonic() - began >= TIMEOUT_S * 0.5


def test_requests_are_served_as_before(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            assert client.get("/ping").json() == {"pong": "yes"}
            time.sleep(TIMEOUT_S / 2)
