"""`RolloutClient`: async HTTP client of one or more rollout servers.

Same `generate` as the in-process engine (a coroutine), plus `info` and the trainer's
`push_weights`. Network failures and 502/503/504 are retried here, at the edge, with
jittered exponential backoff until a deadline (services/clients/retry.py; generation fails
over to the next server); every other error is raised as `RolloutServerError` with the
server's reason.

    async with RolloutClient(["http://127.0.0.1:8200"], api_key=key) as client:
        response = await client.generate(GenerateRequest(prompts=[[5, 6, 7]]))
        probe = make_probe(model, probe_token_ids(vocab_size))
        await client.push_weights(model.state_dict(), version=1, probe=probe)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import torch
from pydantic import BaseModel, ValidationError
from tenacity import stop_before_delay

from services.clients.retry import TransientError, backoff
from services.common import wire
from services.common.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ServerInfo,
    WeightProbe,
    WeightUpdateRequest,
    WeightUpdateResponse,
)
from services.weights.push import UPLOAD_FILE, upload_body, upload_headers, write_weights_file

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
RETRY_STATUSES = {502, 503, 504}
MAX_BACKOFF_S = 5.0


class RolloutServerError(RuntimeError):
    """The server answered with an error: `status`, machine-readable `type`, `message`."""

    def __init__(self, url: str, status: int, type_: str, message: str) -> None:
        super().__init__(f"{url}: {status} {type_}: {message}")
        self.url, self.status, self.type, self.message = url, status, type_, message


def _raise_for_error(url: str, response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = ErrorResponse.model_validate_json(response.content).error
        raise RolloutServerError(url, response.status_code, body.type, body.message)
    except ValidationError:
        raise RolloutServerError(
            url, response.status_code, "http_error", response.text[:500]
        ) from None


def _parse(response: httpx.Response, cls: type[M]) -> M:
    if response.headers.get("content-type", "").startswith(wire.MSGPACK):
        return wire.decode(response.content, cls)
    return cls.model_validate_json(response.content)


class RolloutClient:
    def __init__(
        self,
        urls: str | Sequence[str],
        api_key: str | None = None,
        *,
        timeout_s: float = 600.0,
        deadline_s: float = 120.0,
        backoff_s: float = 0.25,
        follows_registry: bool = False,
    ) -> None:
        """`follows_registry`: `urls` may be empty, `set_urls` fills them (calls wait up to
        `deadline_s` for a server)."""
        self.urls: list[str] = []
        self.set_urls([urls] if isinstance(urls, str) else urls)
        if not self.urls and not follows_registry:
            raise ValueError("RolloutClient needs at least one server URL")
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers
        )
        self._turn = itertools.count()

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        urls: Sequence[str],
        content: Callable[[], Any] | None = None,
        connect_only: bool = False,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send, retrying transport errors and 502/503/504 across `urls` until the deadline.

        `content` makes a fresh body per attempt. `connect_only`: retry only failures that
        prove the request was not processed (a refused connection, 503 while the engine
        loads), since a weight update must not be replayed after a server may have applied it.
        """
        turn = itertools.cycle(urls)
        retry_statuses = {503} if connect_only else RETRY_STATUSES

        async def attempt() -> httpx.Response:
            url = next(turn)
            body = content() if content is not None else None
            try:
                response = await self._http.request(
                    method, url + path, content=body, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise TransientError(f"{type(exc).__name__}: {exc}", url) from exc
            except httpx.TransportError as exc:
                if connect_only:
                    raise
                raise TransientError(f"{type(exc).__name__}: {exc}", url) from exc
            if response.status_code in retry_statuses:
                raise TransientError(f"HTTP {response.status_code}", url)
            _raise_for_error(url, response)
            return response

        policy = backoff(
            TransientError,
            stop_before_delay(self.deadline_s),
            initial_s=self.backoff_s,
            max_s=MAX_BACKOFF_S,
            log=log,
        )
        try:
            return await policy(attempt)
        except TransientError as exc:
            raise RolloutServerError(
                exc.url,
                503,
                "unavailable",
                f"{method} {path} failed until the deadline: {exc.reason}",
            ) from exc

    def set_urls(self, urls: Sequence[str]) -> None:
        """Send to `urls` from now on (a registry's servers); requests under way finish
        where they are."""
        wanted = list(dict.fromkeys(url.rstrip("/") for url in urls))
        if wanted != self.urls and self.urls:
            log.info("rollout servers now %s", wanted or "none")
        self.urls = wanted

    async def _servers(self) -> list[str]:
        """The servers now, waiting up to the deadline while there is none (a registry
        whose servers have not registered yet)."""
        deadline = time.monotonic() + self.deadline_s
        while not self.urls:
            if time.monotonic() >= deadline:
                raise RolloutServerError(
                    "registry", 503, "unavailable", "no rollout server registered in time"
                )
            await asyncio.sleep(0.2)
        return self.urls

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Sample on the next server in turn (failing over to the others)."""
        urls = await self._servers()
        start = next(self._turn) % len(urls)
        order = urls[start:] + urls[:start]
        body = wire.encode(request)
        response = await self._send(
            "POST",
            "/v1/generate",
            urls=order,
            content=lambda: body,
            headers={"content-type": wire.MSGPACK, "accept": wire.MSGPACK},
        )
        return _parse(response, GenerateResponse)

    async def info(self, url: str | None = None) -> ServerInfo:
        """`GET /v1/info` of `url` (default: the first server)."""
        response = await self._send("GET", "/v1/info", urls=[url or (await self._servers())[0]])
        return _parse(response, ServerInfo)

    async def served_versions(self, timeout_s: float) -> dict[str, int | None]:
        """The version each server serves, from one `GET /v1/info` each, without retries:
        cheap enough to ask every few seconds. None for a server that did not answer in
        time, is still loading, or refused."""

        async def one(url: str) -> int | None:
            try:
                response = await self._http.get(url + "/v1/info", timeout=timeout_s)
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            return _parse(response, ServerInfo).policy_version or 0

        versions = await asyncio.gather(*(one(url) for url in self.urls))
        return dict(zip(self.urls, versions, strict=True))

    async def push_weights(
        self,
        state_dict: Mapping[str, torch.Tensor],
        version: int,
        probe: WeightProbe | None = None,
        transport: Literal["http", "file"] = "http",
        shared_dir: Path | None = None,
        urls: Sequence[str] | None = None,
    ) -> WeightUpdateResponse:
        """Send `state_dict` to every server (or to `urls` among them) as `version`;
        returns once all serve it.

        `http` streams the safetensors bytes in the request body; `file` writes them under
        `shared_dir` (a volume the servers can read) and names the file. Each server checks
        the sha256, the tensor names/shapes/dtypes and the `probe` before it answers; any
        refusal raises `RolloutServerError` (that server keeps its old weights). Returns the
        first server's response.
        """
        targets = list(urls or self.urls)
        if transport == "file":
            if shared_dir is None:
                raise ValueError("transport='file' needs shared_dir, a folder the servers can read")
            results = await self._push_file(state_dict, version, probe, shared_dir, targets)
        else:
            results = await self._push_http(state_dict, version, probe, targets)
        return results[0]

    async def _update(
        self,
        url: str,
        path: str,
        content: Callable[[], Any],
        headers: dict[str, str],
        version: int,
    ) -> WeightUpdateResponse:
        """One weight update of one server, applied once. A server applies a version at
        most once (it refuses, 409, any version not above the one it serves), so an update
        cut off mid-way (the server died, or its answer was lost) is sent again: a server
        restarted meanwhile takes it, and one that refuses it as already served had applied
        it. Until the client's deadline, as every call."""
        deadline = time.monotonic() + self.deadline_s
        interrupted = False
        while True:
            try:
                response = await self._send(
                    "POST", path, urls=[url], content=content, headers=headers, connect_only=True
                )
                return WeightUpdateResponse.model_validate_json(response.content)
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("weight update of %s cut off (%r); sending it again", url, exc)
                interrupted = True
            except RolloutServerError as exc:
                if not (interrupted and exc.status == 409):
                    raise
                info = await self.info(url)
                if info.policy_version != version:
                    raise
                log.info(
                    "%s already serves version %d: the cut-off update was applied", url, version
                )
                return WeightUpdateResponse(
                    policy_version=version,
                    revision=info.revision,
                    transport="file" if path == "/v1/weights" else "http",
                    bytes=0,
                    duration_s=0.0,
                )

    async def _push_http(
        self,
        state_dict: Mapping[str, torch.Tensor],
        version: int,
        probe: WeightProbe | None,
        urls: list[str],
    ) -> list[WeightUpdateResponse]:
        headers = await asyncio.to_thread(upload_headers, state_dict, version, probe)

        async def one(url: str) -> WeightUpdateResponse:
            return await self._update(
                url, "/v1/weights/upload", lambda: upload_body(state_dict), headers, version
            )

        return list(await asyncio.gather(*(one(url) for url in urls)))

    async def _push_file(
        self,
        state_dict: Mapping[str, torch.Tensor],
        version: int,
        probe: WeightProbe | None,
        shared_dir: Path,
        urls: list[str],
    ) -> list[WeightUpdateResponse]:
        folder = shared_dir / f"policy-v{version}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        try:
            path = folder / UPLOAD_FILE
            digest = await asyncio.to_thread(write_weights_file, path, state_dict)
            request = WeightUpdateRequest(
                version=version, path=str(path), sha256={UPLOAD_FILE: digest}, probe=probe
            )

            async def one(url: str) -> WeightUpdateResponse:
                return await self._update(
                    url, "/v1/weights", request.model_dump_json, {"content-type": wire.JSON},
                    version,
                )  # fmt: skip

            return list(await asyncio.gather(*(one(url) for url in urls)))
        finally:
            # The servers hard-link (or copy) what they accept, so the file can go.
            shutil.rmtree(folder, ignore_errors=True)
