"""`TeacherClient`: scores sequences on one or more teacher servers and never hangs.

Large batches are split by tokens and the parts sent concurrently; each part goes to the
replica with the fewest outstanding requests among those whose circuit breaker is closed,
fails over at once to another replica when one fails, backs off with jitter once every
replica has failed (services/clients/retry.py), and everything is bounded by one deadline
per call. Past the deadline `TeacherUnavailable` names every replica and its last failure.
A background task polls `/health` so that a dead replica is skipped before a request fails
on it, and a recovered one is used again.

    async with TeacherClient(["http://10.0.0.5:8100", "http://10.0.0.6:8100"]) as teacher:
        response = await teacher.score([ScoreSequence(token_ids=ids, start=len(prompt))])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from types import TracebackType
from typing import TypeVar

import httpx
from pydantic import BaseModel
from tenacity import stop_before_delay

from services.clients.replicas import Replica, ReplicaSet, split_batches
from services.clients.retry import TransientError, backoff
from services.common import wire
from services.common.http_server import API_KEY_ENV
from services.common.protocol import (
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    ServerInfo,
)
from services.common.tokenizer_check import check_compatible

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class TeacherUnavailable(RuntimeError):
    """No replica answered before the deadline; the message names each one's last failure."""


class TeacherRequestError(RuntimeError):
    """A server refused the request itself (4xx other than 429): retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TeacherClient:
    def __init__(
        self,
        urls: list[str],
        api_key: str | None = None,
        deadline_s: float = 60.0,
        *,
        request_timeout_s: float = 30.0,
        max_batch_tokens: int = 32768,
        max_batch_sequences: int = 512,
        breaker_failures: int = 3,
        breaker_open_s: float = 5.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        health_interval_s: float = 2.0,
        binary: bool = True,
    ) -> None:
        """`api_key` defaults to `RLAD_API_KEY`; `deadline_s` bounds every call, retries
        included; a replica's breaker opens for `breaker_open_s` after `breaker_failures`
        consecutive failures (or one failed health check)."""
        self.pool = ReplicaSet(urls, breaker_failures, breaker_open_s)
        self.replicas = self.pool.replicas
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.deadline_s = deadline_s
        self.request_timeout_s = request_timeout_s
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sequences = max_batch_sequences
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.health_interval_s = health_interval_s
        self.binary = binary
        self._http: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TeacherClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
        )
        if self.health_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name="teacher-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._http is not None:
            await self._http.aclose()

    # ------------------------------------------------------------------ public calls

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        """Logprobs of tokens `start..` of every sequence, in order (see module docstring)."""
        if not sequences:
            raise ValueError("score() needs at least one sequence")
        deadline = time.monotonic() + self.deadline_s
        chunks = split_batches(sequences, self.max_batch_tokens, self.max_batch_sequences)
        parts = await asyncio.gather(
            *(self._score_chunk(chunk, top_k, deadline) for chunk in chunks)
        )
        revisions = {part.revision for part in parts}
        if len(revisions) > 1:
            raise TeacherUnavailable(
                f"teacher replicas serve different weights (revisions {sorted(revisions)}): "
                "point the client at replicas of one model"
            )
        return ScoreResponse(
            model=parts[0].model,
            revision=parts[0].revision,
            scores=[scores for part in parts for scores in part.scores],
        )

    async def info(self) -> ServerInfo:
        """`GET /v1/info` from any healthy replica."""
        return await self._request(
            "GET", "/v1/info", None, ServerInfo, time.monotonic() + self.deadline_s
        )

    # ------------------------------------------------------------------ internals

    async def _score_chunk(
        self, chunk: list[ScoreSequence], top_k: int, deadline: float
    ) -> ScoreResponse:
        request = ScoreRequest(sequences=chunk, top_k=top_k)
        body = wire.encode(request) if self.binary else request.model_dump_json().encode()
        return await self._request("POST", "/v1/score", body, ScoreResponse, deadline)

    def _unavailable(self, what: str) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"no teacher replica answered {what} within the {self.deadline_s:.1f}s deadline. "
            f"Last failure per replica: {self.pool.describe()}. Check that the servers run and "
            "are reachable."
        )

    async def _request(
        self, method: str, path: str, body: bytes | None, cls: type[M], deadline: float
    ) -> M:
        policy = backoff(
            TransientError,
            stop_before_delay(deadline - time.monotonic()),
            initial_s=self.backoff_s,
            max_s=self.max_backoff_s,
            log=log,
            level=logging.DEBUG,  # only the final `TeacherUnavailable` matters to callers
        )
        try:
            return await policy(self._round, method, path, body, cls, deadline)
        except TransientError as exc:
            raise self._unavailable(f"{method} {path}") from exc

    async def _round(
        self, method: str, path: str, body: bytes | None, cls: type[M], deadline: float
    ) -> M:
        """One go on each usable replica, least loaded first, failing over at once; the
        first answer wins. Raises `TransientError` when every one has failed."""
        assert self._http is not None, "use `async with TeacherClient(...)` or `await start()`"
        content_type = wire.MSGPACK if self.binary else wire.JSON
        headers = {"content-type": content_type, "accept": content_type}
        tried: set[str] = set()
        while (now := time.monotonic()) < deadline:
            replica = self.pool.pick(tried)
            if replica is None:  # every breaker open: wait for the first to half-open
                await asyncio.sleep(max(0.01, min(self.pool.next_opening(), deadline) - now))
                continue
            tried.add(replica.url)
            replica.outstanding += 1
            try:
                response = await self._http.request(
                    method,
                    replica.url + path,
                    content=body,
                    headers=headers,
                    timeout=min(self.request_timeout_s, deadline - now),
                )
            except httpx.HTTPError as exc:
                self.pool.failed(replica, f"{type(exc).__name__}: {exc}".rstrip(": "))
                response = None
            finally:
                replica.outstanding -= 1
            if response is not None:
                if response.status_code == 200:
                    self.pool.succeeded(replica)
                    return self._decode(response, cls)
                self._handle_refusal(replica, response, f"{method} {path}")
            if self.pool.all_tried(tried):
                break
        raise TransientError(self.pool.describe())

    def _handle_refusal(self, replica: Replica, response: httpx.Response, what: str) -> None:
        """Record a non-200 answer; raise at once when retrying elsewhere cannot help."""
        try:
            message = ErrorResponse.model_validate_json(response.content).error.message
        except ValueError:
            message = response.text[:200]
        reason = f"HTTP {response.status_code}: {message}"
        status = response.status_code
        if status in (429, 503):
            retry_after = response.headers.get("retry-after", "1")
            busy = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0
            self.pool.busy(replica, reason, min(busy, self.max_backoff_s))
        elif status >= 500 or status in (404, 408):
            self.pool.failed(replica, reason)
        else:
            raise TeacherRequestError(status, f"{replica.url} refused {what}: {reason}")

    def _decode(self, response: httpx.Response, cls: type[M]) -> M:
        if response.headers.get("content-type", "").startswith(wire.MSGPACK):
            return wire.decode(response.content, cls)
        return cls.model_validate_json(response.content)

    async def _health_loop(self) -> None:
        assert self._http is not None
        while True:
            await asyncio.gather(*(self._check_health(r) for r in self.replicas))
            await asyncio.sleep(self.health_interval_s)

    async def _check_health(self, replica: Replica) -> None:
        assert self._http is not None
        try:
            response = await self._http.get(replica.url + "/health", timeout=self.health_interval_s)
            healthy, reason = (
                response.status_code == 200,
                f"health check: HTTP {response.status_code}",
            )
        except httpx.HTTPError as exc:
            healthy, reason = False, f"health check: {type(exc).__name__}: {exc}".rstrip(": ")
        self.pool.health(replica, healthy, reason, hold_s=self.health_interval_s)


async def verify_tokenizers(
    teacher: TeacherClient, student_url: str, api_key: str | None = None
) -> ServerInfo:
    """The tokenizer check at start-up (docs/design.md#tokens-and-the-tokenizer-check):
    fetch both `/v1/info`s and refuse a tokenizer mismatch.

    Returns the teacher's info; raises `TokenizerMismatch` naming both fingerprints.
    """
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers, timeout=teacher.request_timeout_s) as http:
        response = await http.get(student_url.rstrip("/") + "/v1/info")
        response.raise_for_status()
        student = ServerInfo.model_validate_json(response.content)
    teacher_info = await teacher.info()
    check_compatible(student, teacher_info)
    return teacher_info
