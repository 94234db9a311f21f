"""`TeacherClient`: scores sequences on one or more teacher servers and never hangs.

Large batches are split by tokens and the parts sent concurrently; each part goes to the
replica with the fewest outstanding requests among those whose circuit breaker is closed,
fails over at once to another replica when one fails, backs off with jitter once every
replica has failed (services/clients/retry.py), and everything is bounded by one deadline
per call. Past the deadline `TeacherUnavailable` names every replica and its last failure.
A background task polls `/health` so that a dead replica is skipped before a request fails
on it, and a recovered one is used again.

Who is at fault decides the error. Only the input itself (422, or 413 for one sequence
alone; a larger part refused as too large is split in two and sent again) raises
`TeacherRequestError`: retrying it cannot help, other inputs can still be scored. Anything
else (a wrong API key, a URL that serves no teacher, an answer that is not a valid
`ScoreResponse`, no answer at all) is the teacher's or the deployment's fault and raises
`TeacherUnavailable`, at once when every replica refused for a reason retrying within
the call cannot fix; callers wait and retry, and the message says what to fix.

    async with TeacherClient(["http://10.0.0.5:8100", "http://10.0.0.6:8100"]) as teacher:
        response = await teacher.score([ScoreSequence(token_ids=ids, start=len(prompt))])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
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
T = TypeVar("T")


class TeacherUnavailable(RuntimeError):
    """No replica scored the request: none answered before the deadline, or each refused it
    for a reason of its own (see the module docstring). The message names each replica's
    last failure and what to fix; the same request can succeed once that is fixed."""


class TeacherRequestError(RuntimeError):
    """The teacher refused this input (422, or 413 for a single sequence): retrying it
    cannot help, other inputs can still be scored."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Why a replica refuses a request whatever sequences it carries, and how to fix it.
_SAME_KEY = f"the client's {API_KEY_ENV} does not match the teacher's: give both the same key"
_NO_TEACHER = "no teacher API at this URL: check --teacher-url / TEACHER_URLS"
_OTHER_VERSION = "the teacher cannot read this client's requests: run one rlad version on both"
REFUSAL_HINTS = {
    400: _OTHER_VERSION,
    401: _SAME_KEY,
    403: _SAME_KEY,
    404: _NO_TEACHER,
    405: _NO_TEACHER,
    415: _OTHER_VERSION,
}


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
        follows_registry: bool = False,
    ) -> None:
        """`api_key` defaults to `RLAD_API_KEY`; `deadline_s` bounds every call, retries
        included; a replica's breaker opens for `breaker_open_s` after `breaker_failures`
        consecutive failures (or one failed health check). `follows_registry`: `urls` may
        be empty, `set_urls` fills them."""
        if not urls and not follows_registry:
            raise ValueError("TeacherClient needs at least one teacher URL")
        self.pool = ReplicaSet(urls, breaker_failures, breaker_open_s)
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
        return _merge(await _all(self._score_chunk(chunk, top_k, deadline) for chunk in chunks))

    async def info(self) -> ServerInfo:
        """`GET /v1/info` from any healthy replica."""
        return await self._request(
            "GET", "/v1/info", None, ServerInfo, time.monotonic() + self.deadline_s
        )

    @property
    def replicas(self) -> list[Replica]:
        return self.pool.replicas

    def set_urls(self, urls: list[str]) -> None:
        """Change the replicas at run time (a registry's servers): new ones get requests at
        once, removed ones none after the requests they are answering (see `ReplicaSet`)."""
        added, removed = self.pool.set_urls(urls)
        if added or removed:
            log.info(
                "teacher replicas now %s (added %s, removed %s)",
                [r.url for r in self.replicas] or "none",
                added or "none",
                removed or "none",
            )

    def reachable(self) -> bool:
        """Whether some replica may answer now, as the health checks and the last calls
        found (no request is made): a scorer in degraded mode tries the teacher again once
        this turns true."""
        return self.pool.any_reachable()

    # ------------------------------------------------------------------ internals

    async def _score_chunk(
        self, chunk: list[ScoreSequence], top_k: int, deadline: float
    ) -> ScoreResponse:
        """Score one request; one refused as too large (the teacher's limits are lower
        than this client's) is split in two until each part fits or is a single sequence."""
        request = ScoreRequest(sequences=chunk, top_k=top_k)
        body = wire.encode(request) if self.binary else request.model_dump_json().encode()
        try:
            return await self._request(
                "POST", "/v1/score", body, ScoreResponse, deadline, _scores_for(chunk)
            )
        except TeacherRequestError as exc:
            if exc.status != 413 or len(chunk) == 1:
                raise
            log.info("teacher refused %d sequences as too large; sending halves", len(chunk))
        half = len(chunk) // 2
        halves = (chunk[:half], chunk[half:])
        return _merge(await _all(self._score_chunk(part, top_k, deadline) for part in halves))

    def _unavailable(self, what: str) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"no teacher replica answered {what} within the {self.deadline_s:.1f}s deadline. "
            f"Last failure per replica: {self.pool.describe()}. Check that the servers run and "
            "are reachable."
        )

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        cls: type[M],
        deadline: float,
        check: Callable[[M], None] | None = None,
    ) -> M:
        """The answer of the first replica that gives a valid one (`check` raises
        `ValueError` on one that does not fit the request)."""
        policy = backoff(
            TransientError,
            stop_before_delay(deadline - time.monotonic()),
            initial_s=self.backoff_s,
            max_s=self.max_backoff_s,
            log=log,
            level=logging.DEBUG,  # only the final `TeacherUnavailable` matters to callers
        )
        try:
            return await policy(self._round, method, path, body, cls, deadline, check)
        except TransientError as exc:
            raise self._unavailable(f"{method} {path}") from exc

    async def _round(
        self,
        method: str,
        path: str,
        body: bytes | None,
        cls: type[M],
        deadline: float,
        check: Callable[[M], None] | None,
    ) -> M:
        """One go on each usable replica, least loaded first, failing over at once; the
        first valid answer wins. Raises `TransientError` when every one has failed, or
        `TeacherUnavailable` when each refused in a way another try cannot fix."""
        assert self._http is not None, "use `async with TeacherClient(...)` or `await start()`"
        content_type = wire.MSGPACK if self.binary else wire.JSON
        headers = {"content-type": content_type, "accept": content_type}
        what = f"{method} {path}"
        tried: set[str] = set()
        refused: set[str] = set()
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
            if response is not None and response.status_code == 200:
                try:
                    answer = _decode(response, cls)
                    if check is not None:
                        check(answer)
                except ValueError as exc:
                    self.pool.failed(
                        replica,
                        f"HTTP 200 with an answer that is not a valid {cls.__name__} "
                        f"({wire.describe_invalid(exc)}): "
                        "check that the URL serves an rlad teacher of the client's version",
                    )
                    refused.add(replica.url)
                else:
                    self.pool.succeeded(replica)
                    return answer
            elif response is not None and self._handle_refusal(replica, response, what):
                refused.add(replica.url)
            if self.pool.all_tried(tried):
                break
        if refused and refused == tried:
            raise TeacherUnavailable(
                f"the teacher refuses {what} whatever it carries: fix what its last failure "
                f"says. Last failure per replica: {self.pool.describe()}"
            )
        raise TransientError(self.pool.describe())

    def _handle_refusal(self, replica: Replica, response: httpx.Response, what: str) -> bool:
        """Record a non-200 answer. Raise `TeacherRequestError` when the input is at fault;
        return True when the replica refused in a way that another try cannot fix."""
        try:
            message = ErrorResponse.model_validate_json(response.content).error.message
        except ValueError:
            message = response.text[:200]
        reason = f"HTTP {response.status_code}: {message}"
        status = response.status_code
        if status in (413, 422):
            raise TeacherRequestError(status, f"{replica.url} refused {what}: {reason}")
        if status in (429, 503):
            retry_after = response.headers.get("retry-after", "1")
            busy = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0
            self.pool.busy(replica, reason, min(busy, self.max_backoff_s))
            return False
        if status >= 500 or status == 408:
            self.pool.failed(replica, reason)
            return False
        hint = REFUSAL_HINTS.get(status, "see the teacher's log")
        self.pool.failed(replica, f"{reason}: {hint}")
        return True

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


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await every call concurrently; the first failure cancels the others, so that no
    orphaned request keeps a replica busy after its result can no longer be used."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op on the finished ones


def _merge(parts: list[ScoreResponse]) -> ScoreResponse:
    """The answers to consecutive parts of one request, as one answer."""
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


def _scores_for(chunk: list[ScoreSequence]) -> Callable[[ScoreResponse], None]:
    """A check that an answer holds one logprob per scored token of every sequence."""

    def check(response: ScoreResponse) -> None:
        if len(response.scores) != len(chunk):
            raise ValueError(f"{len(response.scores)} scores for {len(chunk)} sequences")
        for index, (seq, scores) in enumerate(zip(chunk, response.scores, strict=True)):
            if len(scores.logprobs) != len(seq.token_ids) - seq.start:
                raise ValueError(
                    f"scores[{index}] has {len(scores.logprobs)} logprobs for "
                    f"{len(seq.token_ids) - seq.start} scored tokens"
                )

    return check


def _decode(response: httpx.Response, cls: type[M]) -> M:
    """Raises `ValueError` (a pydantic or wire error) on a body that is not a valid `cls`."""
    if response.headers.get("content-type", "").startswith(wire.MSGPACK):
        return wire.decode(response.content, cls)
    return cls.model_validate_json(response.content)


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
