"""`TeacherClient`: scores sequences on one or more teacher servers and never hangs.

Large batches are split by tokens and the parts sent concurrently; each part goes to the
replica with the fewest outstanding requests among those whose circuit breaker is closed,
fails over at once to another replica when one fails, backs off with jitter once every
replica has failed (services/clients/retry.py), and everything is bounded by one deadline
per call. Past the deadline `TeacherUnavailable` names every replica and its last failure.
A background task polls `/health` so that a dead replica is skipped before a request fails
on it, and a recovered one is used again.

Each replica speaks the API its URL names (services/clients/teacher_api.py): an rlad
teacher server (`http://host:8100`) or an OpenAI-compatible server such as `vllm serve`
(`openai+http://host:8000/v1`, services/clients/openai_teacher.py); kinds may be mixed.

Who is at fault decides the error. Only the input itself (422, or 413 for one sequence
alone; a larger part refused as too large is split in two and sent again; from vLLM, a
400 that blames the prompt) raises `TeacherRequestError`: retrying it cannot help, other
inputs can still be scored. Anything else (a wrong API key, a URL that serves no teacher,
an answer that is not a valid `ScoreResponse`, no answer at all) is the teacher's or the
deployment's fault and raises `TeacherUnavailable`, at once when every replica refused
for a reason retrying within the call cannot fix; callers wait and retry, and the message
says what to fix.

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
from tenacity import stop_before_delay

from services.clients.openai_teacher import OpenAiApi
from services.clients.replicas import Replica, ReplicaSet, split_batches
from services.clients.retry import TransientError, backoff
from services.clients.teacher_api import ApiCall, HttpCall, RladApi, TeacherApi
from services.common import wire
from services.common.http_server import API_KEY_ENV
from services.common.protocol import (
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
    ServerInfo,
)
from services.config.workers import parse_teacher_url

log = logging.getLogger(__name__)
M = TypeVar("M")
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
        """`urls` name each replica's API (`services.config.workers.parse_teacher_url`);
        `api_key` defaults to `RLAD_API_KEY`; `deadline_s` bounds every call, retries
        included; a replica's breaker opens for `breaker_open_s` after `breaker_failures`
        consecutive failures (or one failed health check). `follows_registry`: `urls` may
        be empty, `set_urls` fills them."""
        if not urls and not follows_registry:
            raise ValueError("TeacherClient needs at least one teacher URL")
        self._apis_by_kind: dict[str, TeacherApi] = {"rlad": RladApi(binary), "openai": OpenAiApi()}
        self.apis: dict[str, TeacherApi] = {}  # by replica URL
        self.pool = ReplicaSet(self._roots(urls), breaker_failures, breaker_open_s)
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
        return _merge(
            await all_or_cancel(self._score_chunk(chunk, top_k, deadline) for chunk in chunks)
        )

    async def info(self) -> ServerInfo:
        """What any healthy replica publishes: an rlad teacher's `GET /v1/info`, or what
        a `vllm serve` shows (`services.clients.openai_teacher.server_info`)."""
        return await self._request(lambda api: api.info(), time.monotonic() + self.deadline_s)

    @property
    def replicas(self) -> list[Replica]:
        return self.pool.replicas

    def set_urls(self, urls: list[str]) -> None:
        """Change the replicas at run time (a registry's servers): new ones get requests at
        once, removed ones none after the requests they are answering (see `ReplicaSet`)."""
        added, removed = self.pool.set_urls(self._roots(urls))
        if added or removed:
            log.info(
                "teacher replicas now %s (added %s, removed %s)",
                [r.url for r in self.replicas] or "none",
                added or "none",
                removed or "none",
            )

    def _roots(self, urls: list[str]) -> list[str]:
        """Each replica's root URL, noting the API its URL names (`parse_teacher_url`)."""
        roots = []
        for kind, root in map(parse_teacher_url, urls):
            self.apis[root] = self._apis_by_kind[kind]
            roots.append(root)
        return roots

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
        try:
            return await self._request(
                lambda api: api.score(request), deadline, _scores_for(chunk, top_k)
            )
        except TeacherRequestError as exc:
            if exc.status != 413 or len(chunk) == 1:
                raise
            log.info("teacher refused %d sequences as too large; sending halves", len(chunk))
        half = len(chunk) // 2
        halves = (chunk[:half], chunk[half:])
        return _merge(
            await all_or_cancel(self._score_chunk(part, top_k, deadline) for part in halves)
        )

    def _unavailable(self, what: str) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"no teacher replica answered {what} within the {self.deadline_s:.1f}s deadline. "
            f"Last failure per replica: {self.pool.describe()}. Check that the servers run and "
            "are reachable."
        )

    async def _request(
        self,
        call_for: Callable[[TeacherApi], ApiCall[M]],
        deadline: float,
        check: Callable[[M], None] | None = None,
    ) -> M:
        """The answer of the first replica that gives a valid one to the call its API
        makes (`check` raises `ValueError` on one that does not fit the request)."""
        calls: dict[str, ApiCall[M]] = {}  # encoded once per kind of API

        def call_of(replica: Replica) -> ApiCall[M]:
            api = self.apis[replica.url]
            if api.kind not in calls:
                calls[api.kind] = call_for(api)
            return calls[api.kind]

        policy = backoff(
            TransientError,
            stop_before_delay(deadline - time.monotonic()),
            initial_s=self.backoff_s,
            max_s=self.max_backoff_s,
            log=log,
            level=logging.DEBUG,  # only the final `TeacherUnavailable` matters to callers
        )
        try:
            return await policy(self._round, call_of, deadline, check)
        except TransientError as exc:
            what = {f"{c.request.method} {c.request.path}" for c in calls.values()}
            raise self._unavailable(" / ".join(sorted(what))) from exc

    async def _round(
        self,
        call_of: Callable[[Replica], ApiCall[M]],
        deadline: float,
        check: Callable[[M], None] | None,
    ) -> M:
        """One go on each usable replica, least loaded first, failing over at once; the
        first valid answer wins. Raises `TransientError` when every one has failed, or
        `TeacherUnavailable` when each refused in a way another try cannot fix."""
        assert self._http is not None, "use `async with TeacherClient(...)` or `await start()`"
        what = ""
        tried: set[str] = set()
        refused: set[str] = set()
        while (now := time.monotonic()) < deadline:
            replica = self.pool.pick(tried)
            if replica is None:  # every breaker open: wait for the first to half-open
                await asyncio.sleep(max(0.01, min(self.pool.next_opening(), deadline) - now))
                continue
            tried.add(replica.url)
            call = call_of(replica)
            what = f"{call.request.method} {call.request.path}"
            replica.outstanding += 1
            try:
                response = await self._send(replica, call.request, deadline)
                extras = (
                    [
                        await self._send(replica, extra, deadline, quiet=True)
                        for extra in call.extras
                    ]
                    if response is not None and response.status_code == 200
                    else []
                )
            finally:
                replica.outstanding -= 1
            if response is not None and response.status_code == 200:
                try:
                    answer = call.decode(response, extras)
                    if check is not None:
                        check(answer)
                except ValueError as exc:
                    hint = self.apis[replica.url].invalid_answer_hint
                    self.pool.failed(
                        replica,
                        f"HTTP 200 with an answer that is not a valid {call.answer} "
                        f"({wire.describe_invalid(exc)}): {hint}",
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

    async def _send(
        self, replica: Replica, call: HttpCall, deadline: float, *, quiet: bool = False
    ) -> httpx.Response | None:
        """One HTTP request to `replica`; None when no answer came (recorded as its failure
        unless `quiet`: an extra's failure is not the replica's)."""
        assert self._http is not None
        try:
            return await self._http.request(
                call.method,
                replica.url + call.path,
                content=call.body,
                headers=dict(call.headers),
                timeout=max(0.001, min(self.request_timeout_s, deadline - time.monotonic())),
            )
        except httpx.HTTPError as exc:
            if not quiet:
                self.pool.failed(replica, f"{type(exc).__name__}: {exc}".rstrip(": "))
            return None

    def _handle_refusal(self, replica: Replica, response: httpx.Response, what: str) -> bool:
        """Record a non-200 answer. Raise `TeacherRequestError` when the input is at fault;
        return True when the replica refused in a way that another try cannot fix."""
        api = self.apis[replica.url]
        message = api.error_message(response)
        reason = f"HTTP {response.status_code}: {message}"
        status = response.status_code
        if api.input_fault(response):
            raise TeacherRequestError(status, f"{replica.url} refused {what}: {reason}")
        if status in (429, 503):
            retry_after = response.headers.get("retry-after", "1")
            busy = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0
            self.pool.busy(replica, reason, min(busy, self.max_backoff_s))
            return False
        if status >= 500 or status == 408:
            self.pool.failed(replica, reason)
            return False
        hint = api.refusal_hints.get(status, "see the teacher's log")
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
            response = await self._http.get(
                replica.url + self.apis[replica.url].health_path, timeout=self.health_interval_s
            )
            healthy, reason = (
                response.status_code == 200,
                f"health check: HTTP {response.status_code}",
            )
        except httpx.HTTPError as exc:
            healthy, reason = False, f"health check: {type(exc).__name__}: {exc}".rstrip(": ")
        self.pool.health(replica, healthy, reason, hold_s=self.health_interval_s)


async def all_or_cancel(calls: Iterable[Awaitable[T]]) -> list[T]:
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


def _scores_for(chunk: list[ScoreSequence], top_k: int) -> Callable[[ScoreResponse], None]:
    """A check that an answer holds one logprob per scored token of every sequence, and
    with `top_k`, one row of `top_k` ids and logprobs per scored token."""

    def check(response: ScoreResponse) -> None:
        if len(response.scores) != len(chunk):
            raise ValueError(f"{len(response.scores)} scores for {len(chunk)} sequences")
        for index, (seq, scores) in enumerate(zip(chunk, response.scores, strict=True)):
            if len(scores.logprobs) != len(seq.token_ids) - seq.start:
                raise ValueError(
                    f"scores[{index}] has {len(scores.logprobs)} logprobs for "
                    f"{len(seq.token_ids) - seq.start} scored tokens"
                )
            if top_k and not _top_k_rows(scores, len(scores.logprobs), top_k):
                raise ValueError(f"scores[{index}] has no [{len(scores.logprobs)}][{top_k}] top-k")

    return check


def _top_k_rows(scores: SequenceScores, n_scored: int, top_k: int) -> bool:
    """Whether both top-k tables are `[n_scored][top_k]`."""
    tables = (scores.top_k_ids, scores.top_k_logprobs)
    return all(
        table is not None and len(table) == n_scored and all(len(row) == top_k for row in table)
        for table in tables
    )
