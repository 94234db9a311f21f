"""Helpers for the tests of both servers: an app served in a background thread the way
`rlad serve-*` serves it (uvicorn with the header deadline, real HTTP on loopback), raw
sockets for clients that misbehave, and a timed `/health` probe. For the clients' tests, a
scripted server that answers with the statuses it is given."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel

from services.common.http_transport import header_timeout_protocol
from services.common.protocol import ErrorBody, ErrorResponse
from services.common.runtime import free_port


class ThreadedServer:
    """`app` under uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, app: Any, header_timeout_s: float, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                http=header_timeout_protocol(header_timeout_s),
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"in-process server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __exit__(self, *_: object) -> None:
        self.stop()


class ScriptedServer:
    """Answers each request with the next scripted status (an error of type `error_type`),
    then 200 with `body`; records the path of every request. Runs under uvicorn on the
    test's event loop."""

    def __init__(self, statuses: list[int], body: BaseModel, error_type: str = "scripted") -> None:
        self.statuses = list(statuses)
        self.body = body
        self.error_type = error_type
        self.requests: list[str] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        app = FastAPI()
        app.add_api_route("/{path:path}", self.answer, methods=["GET", "POST"])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def answer(self, path: str) -> Response:
        self.requests.append(f"/{path}")
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            return Response(self.body.model_dump_json(), media_type="application/json")
        error = ErrorResponse(error=ErrorBody(type=self.error_type, message=f"scripted {status}"))
        return Response(
            error.model_dump_json(),
            status_code=status,
            media_type="application/json",
            headers={"retry-after": "0"},
        )

    async def __aenter__(self) -> ScriptedServer:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


def health_seconds(url: str) -> float:
    """How long `GET /health` takes to answer 200 (the event loop's responsiveness)."""
    began = time.monotonic()
    response = httpx.get(f"{url}/health", timeout=30)
    assert response.status_code == 200, response.text
    return time.monotonic() - began


def raw_connection(url: str, head: bytes, timeout_s: float = 30) -> socket.socket:
    """A connection to the server at `url` that has sent exactly `head`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(head)
    return sock


def post_head(path: str, content_length: int, content_type: str = "application/json") -> bytes:
    """The request line and headers of a POST whose body has not been sent yet."""
    return (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n"
        f"content-length: {content_length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response from `sock`: headers and body may come in separate packets."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
        head_end = answer.find(b"\r\n\r\n")
        if head_end >= 0:
            match = re.search(rb"content-length: (\d+)", answer[:head_end].lower())
            if match and len(answer) - head_end - 4 >= int(match.group(1)):
                break
    return answer


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def seconds_until_closed(sock: socket.socket) -> float:
    """How long until the server closes `sock`, which must receive nothing before that."""
    began = time.monotonic()
    assert read_until_closed(sock) == b""
    return time.monotonic() - began


def slow_headers_are_cut_off(url: str, path: str, header_timeout_s: float) -> None:
    """Twenty connections that never finish their headers (one still dribbling bytes) are
    closed once the header deadline passes, and `/health` answers meanwhile."""
    idle = [raw_connection(url, f"POST {path} HTTP/1.1\r\nhost: t".encode()) for _ in range(20)]
    dribbling = raw_connection(url, b"POST ")
    began = time.monotonic()
    for byte in f"{path} HTTP/1.1\r\nhost: test\r\n".encode():
        if time.monotonic() - began > header_timeout_s + 1:
            break
        try:
            dribbling.sendall(bytes([byte]))
        except OSError:  # closed by the server: what the test expects
            break
        assert health_seconds(url) < 1.0
        time.sleep(0.1)
    for sock in [*idle, dribbling]:
        with sock:
            waited = seconds_until_closed(sock)
        assert time.monotonic() - began < header_timeout_s + 3, waited


def slow_body_times_out(url: str, path: str, body_timeout_s: float) -> None:
    """A body that stops half-way gets 408 once `body_timeout_s` passes; `/health` answers
    meanwhile."""
    with raw_connection(url, post_head(path, 1000) + b'{"se') as sock:
        began = time.monotonic()
        assert health_seconds(url) < 1.0
        answer = read_until_closed(sock)
        waited = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer
    assert body_timeout_s - 0.5 < waited < body_timeout_s + 3


def hang_up_mid_body(url: str, path: str) -> None:
    """Send a quarter of a declared body and close the connection; `/health` still answers
    within a second."""
    with raw_connection(url, post_head(path, 1000) + b'{"se'):
        pass
    time.sleep(0.2)  # the server notices the hang-up
    assert health_seconds(url) < 1.0
