"""Dynamic batching and bounded admission, with a recording stand-in for the engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from services.common.http_server import ApiError
from services.common.protocol import ScoreSequence, SequenceScores
from teacher_server.batcher import DynamicBatcher, truncate_top_k


class RecordingEngine:
    """Scores token t as -t (and top-k ids 0..k-1); records every call's batch."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []  # (sequences, top_k)
        self.gate = gate
        self.fail = fail

    def __call__(self, sequences: Sequence[ScoreSequence], top_k: int) -> list[SequenceScores]:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.calls.append((len(sequences), top_k))
        if self.fail:
            raise RuntimeError("engine exploded")
        out = []
        for seq in sequences:
            scored = seq.token_ids[seq.start :]
            scores = SequenceScores(logprobs=[-float(t) for t in scored])
            if top_k:
                scores.top_k_ids = [list(range(top_k)) for _ in scored]
                scores.top_k_logprobs = [[-float(j) for j in range(top_k)] for _ in scored]
            out.append(scores)
        return out


def _seq(first: int, length: int = 4) -> ScoreSequence:
    return ScoreSequence(token_ids=list(range(first, first + length)), start=1)


def _batcher(engine: RecordingEngine, **overrides: object) -> DynamicBatcher:
    options: dict[str, object] = {
        "max_batch_tokens": 64, "max_wait_s": 0.05, "max_queue_tokens": 128,
    } | overrides  # fmt: skip
    return DynamicBatcher(engine, cost_fn=tokens, **options)  # type: ignore[arg-type]


def tokens(sequences: Sequence[ScoreSequence], top_k: int) -> int:
    """A cost of one per token, so the tests can count admission by hand."""
    return sum(len(seq.token_ids) for seq in sequences)


def test_concurrent_requests_share_one_engine_call_and_get_their_own_answers() -> None:
    engine = RecordingEngine()

    async def run() -> list[list[SequenceScores]]:
        batcher = _batcher(engine)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([_seq(10 * i)], 0) for i in range(8)))
        finally:
            await batcher.stop()

    results = asyncio.run(run())
    assert engine.calls == [(8, 0)]  # 8 x 4 tokens fit the 64-token budget
    for i, (scores,) in enumerate(results):
        assert scores.logprobs == [-float(10 * i + j) for j in (1, 2, 3)]


def test_token_budget_splits_batches_and_disabled_batching_scores_one_by_one() -> None:
    budgeted, single = RecordingEngine(), RecordingEngine()

    async def run(engine: RecordingEngine, **options: object) -> None:
        batcher = _batcher(engine, **options)
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.submit([_seq(i, 8)], 0) for i in range(6)))
        finally:
            await batcher.stop()

    asyncio.run(run(budgeted, max_batch_tokens=16))
    asyncio.run(run(single, enabled=False))
    assert [n for n, _ in budgeted.calls] == [2, 2, 2]  # 16 tokens = two 8-token sequences
    assert [n for n, _ in single.calls] == [1] * 6


def test_mixed_top_k_runs_once_with_the_largest_k_and_each_gets_its_own_k() -> None:
    engine = RecordingEngine()

    async def run() -> list[list[SequenceScores]]:
        batcher = _batcher(engine)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([_seq(1)], k) for k in (0, 2, 5)))
        finally:
            await batcher.stop()

    none, two, five = (r[0] for r in asyncio.run(run()))
    assert engine.calls == [(3, 5)]
    assert none.top_k_ids is None and none.top_k_logprobs is None
    assert two.top_k_ids == [[0, 1]] * 3 and five.top_k_ids == [[0, 1, 2, 3, 4]] * 3


def test_full_queue_answers_429_with_retry_after_and_frees_its_budget() -> None:
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)

    async def run() -> None:
        batcher = _batcher(engine, max_batch_tokens=64, max_queue_tokens=64)
        await batcher.start()
        try:
            held = asyncio.create_task(batcher.submit([_seq(0, 60)], 0))
            await asyncio.sleep(0.1)  # admitted, the engine is blocked on the gate
            with pytest.raises(ApiError) as refused:
                await batcher.submit([_seq(0, 8)], 0)
            assert refused.value.status == 429
            assert refused.value.headers is not None
            assert int(refused.value.headers["Retry-After"]) >= 1
            gate.set()
            await held
            assert batcher.admission.admitted == 0
            await batcher.submit([_seq(0, 8)], 0)  # admitted again once drained
        finally:
            gate.set()
            await batcher.stop()

    asyncio.run(run())


def test_engine_failure_reaches_every_waiter_and_the_worker_keeps_serving() -> None:
    engine = RecordingEngine(fail=True)

    async def run() -> None:
        batcher = _batcher(engine)
        await batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.submit([_seq(i)], 0) for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RuntimeError) for r in results)
            engine.fail = False
            (scores,) = await batcher.submit([_seq(0)], 0)
            assert scores.logprobs == [-1.0, -2.0, -3.0]
        finally:
            await batcher.stop()

    asyncio.run(run())


def test_truncate_top_k_keeps_the_most_likely_prefix() -> None:
    full = SequenceScores(logprobs=[-1.0], top_k_ids=[[7, 3, 9]], top_k_logprobs=[[-1, -2, -3]])
    assert truncate_top_k(full, 2).top_k_ids == [[7, 3]]
    assert truncate_top_k(full, 2).top_k_logprobs == [[-1, -2]]
    assert truncate_top_k(full, 0) == SequenceScores(logprobs=[-1.0])
