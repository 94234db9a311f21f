"""Dynamic batching with bounded admission, between the HTTP routes and the engine.

Concurrent requests wait in one FIFO queue; a single worker task takes as many as fit in
`max_batch_tokens` (waiting at most `max_wait_s` after the oldest arrived for more to
join), scores them in one engine call on a worker thread, and hands each request its
slice. While the engine is busy the queue fills, so batches grow with load by themselves.

Admission is bounded by cost (`services.common.admission`): `max_queue_tokens` counts the
waiting and running work as the engine's `cost` prices it (padded tokens plus top-k
entries); past it `submit` raises a 429 with a Retry-After estimated from the measured
throughput, so memory and waiting time stay bounded whatever the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.admission import Admission
from services.common.http_server import ApiError, short_traceback
from services.common.protocol import ScoreSequence, SequenceScores
from teacher_server.metrics import TeacherMetrics

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[ScoreSequence], int], list[SequenceScores]]
CostFn = Callable[[Sequence[ScoreSequence], int], int]


@dataclass
class _Job:
    sequences: list[ScoreSequence]
    top_k: int
    tokens: int
    future: asyncio.Future[list[SequenceScores]]
    arrived: float = field(default_factory=time.monotonic)


def truncate_top_k(scores: SequenceScores, top_k: int) -> SequenceScores:
    """Scores computed with a larger k cut down to `top_k` (top-k lists are sorted)."""
    if scores.top_k_ids is None or scores.top_k_logprobs is None:
        return scores
    if top_k == 0:
        return SequenceScores(logprobs=scores.logprobs)
    return SequenceScores(
        logprobs=scores.logprobs,
        top_k_ids=[row[:top_k] for row in scores.top_k_ids],
        top_k_logprobs=[row[:top_k] for row in scores.top_k_logprobs],
    )


class DynamicBatcher:
    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        cost_fn: CostFn,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_tokens: int,
        enabled: bool = True,
        metrics: TeacherMetrics | None = None,
    ) -> None:
        self.score_fn = score_fn
        self.cost_fn = cost_fn
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.metrics = metrics or TeacherMetrics()
        self.admission = Admission(max_queue_tokens, "tokens")
        self.metrics.queue_tokens.set_function(lambda: self.admission.admitted)
        self.metrics.queue_requests.set_function(lambda: self.admission.requests)
        self._pending: deque[_Job] = deque()
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="teacher-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "server is stopping"))

    async def submit(self, sequences: list[ScoreSequence], top_k: int) -> list[SequenceScores]:
        """Score `sequences` within some batch; 413/429 when admission cannot take them."""
        tokens = sum(len(seq.token_ids) for seq in sequences)
        with self.admission.hold(self.cost_fn(sequences, top_k)):
            job = _Job(sequences, top_k, tokens, asyncio.get_running_loop().create_future())
            self._pending.append(job)
            self._arrival.set()
            return await job.future

    def _pending_tokens(self) -> int:
        return sum(job.tokens for job in self._pending)

    async def _next_batch(self) -> list[_Job]:
        while not self._pending:
            self._arrival.clear()
            await self._arrival.wait()
        if self.enabled:
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._pending_tokens() < self.max_batch_tokens:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrival.wait(), remaining)
        batch = [self._pending.popleft()]
        budget = self.max_batch_tokens - batch[0].tokens
        while self.enabled and self._pending and self._pending[0].tokens <= budget:
            budget -= self._pending[0].tokens
            batch.append(self._pending.popleft())
        # A client that went away no longer needs its work done.
        return [job for job in batch if not job.future.done()]

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._score(batch)

    async def _score(self, batch: list[_Job]) -> None:
        sequences = [seq for job in batch for seq in job.sequences]
        tokens = sum(job.tokens for job in batch)
        top_k = max(job.top_k for job in batch)
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.batch_sequences.observe(len(sequences))
        self.metrics.batch_tokens.observe(tokens)
        try:
            scores = await asyncio.to_thread(self.score_fn, sequences, top_k)
        except Exception as exc:  # every waiter hears about it; the worker keeps serving
            log.error(
                "engine call failed for a batch of %d sequences\n%s",
                len(sequences),
                short_traceback(exc),
            )
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.metrics.engine_tokens.inc(tokens)
        offset = 0
        for job in batch:
            mine = scores[offset : offset + len(job.sequences)]
            offset += len(job.sequences)
            if not job.future.done():
                job.future.set_result([truncate_top_k(s, job.top_k) for s in mine])
