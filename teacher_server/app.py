"""The teacher server's HTTP app: `create_app(config)` over a `TeacherEngine`.

Routes stay thin: read and validate the body, answer cached sequences from the LRU cache,
send the rest through the dynamic batcher to the engine, respond in JSON or msgpack.

    rlad serve-teacher --model path/to/teacher --backend hf --port 8100
    curl -s localhost:8100/v1/score -H 'content-type: application/json' \
        -d '{"sequences": [{"token_ids": [5, 6, 7, 8], "start": 2}]}'
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.common.http_server import (
    ApiError,
    create_base_app,
    document_bodies,
    error_docs,
    read_body,
    respond,
)
from services.common.protocol import (
    ScoreRequest,
    ScoreResponse,
    SequenceScores,
    ServerInfo,
)
from services.config.servers import TeacherServerConfig
from teacher_server.backends import load_engine
from teacher_server.batcher import DynamicBatcher
from teacher_server.cache import LogprobCache, cache_key
from teacher_server.metrics import TeacherMetrics
from teacher_server.teacher_engine import TeacherEngine, validate_request

DESCRIPTION = """Returns a teacher model's logprob of every given token (and optionally the
top-k alternatives), for distillation. Bodies are JSON or msgpack (`application/msgpack`,
numeric lists as raw little-endian int32/float32 arrays, see `services.common.wire`); send
`Accept: application/msgpack` to get msgpack back. When the server has `RLAD_API_KEY`
set, every route except `/health` and `/metrics` needs `Authorization: Bearer <key>`."""

SCORE_ERRORS = error_docs(
    {
        400: "Body is not valid JSON / msgpack.",
        401: "Missing or wrong bearer token.",
        408: "The body did not arrive within body_timeout_s.",
        413: "Body, total tokens or the work they ask for over the limit.",
        415: "Content-Type is neither JSON nor msgpack.",
        422: "Invalid request: names the sequence and index (empty, `start` out of range, id "
        "outside the vocabulary, longer than max_model_len, top_k too large).",
        429: "Admission bound full; see the Retry-After header.",
        503: "Engine still loading.",
    }
)


class _State:
    engine: TeacherEngine | None = None
    batcher: DynamicBatcher | None = None


async def score_through_cache(
    request: ScoreRequest,
    revision: str,
    cache: LogprobCache,
    batcher: DynamicBatcher,
    metrics: TeacherMetrics,
) -> list[SequenceScores]:
    """Scores of every sequence: cached ones from the cache, the rest from one batch."""
    if not cache.max_bytes:
        return await batcher.submit(request.sequences, request.top_k)
    keys = [cache_key(revision, seq, request.top_k) for seq in request.sequences]
    results = [cache.get(key) for key in keys]
    missing = [i for i, found in enumerate(results) if found is None]
    metrics.cache_hits.inc(len(results) - len(missing))
    metrics.cache_misses.inc(len(missing))
    if missing:
        fresh = await batcher.submit([request.sequences[i] for i in missing], request.top_k)
        for i, scores in zip(missing, fresh, strict=True):
            results[i] = scores
            cache.put(keys[i], scores)
        metrics.cache_bytes.set(cache.bytes)
    return [r for r in results if r is not None]


def create_app(config: TeacherServerConfig, engine: TeacherEngine | None = None) -> FastAPI:
    """The app; loads the engine the config names at start-up unless one is passed in."""
    metrics = TeacherMetrics()
    cache = LogprobCache(config.cache_bytes)
    state = _State()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            state.engine = await asyncio.to_thread(load_engine, config)
        else:
            state.engine = engine
        state.batcher = DynamicBatcher(
            state.engine.score_sequences,
            cost_fn=state.engine.cost,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue_tokens=config.max_queue_tokens,
            enabled=config.dynamic_batching,
            metrics=metrics,
        )
        await state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            if engine is None:
                state.engine.close()
            state.engine = None

    app = create_base_app(
        title="RLAD teacher server",
        description=DESCRIPTION,
        registry=metrics.registry,
        lifespan=lifespan,
        is_ready=lambda: state.engine is not None,
        info=lambda: ready()[0].info(),
    )

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], Any]) -> Response:
        try:
            response: Response = await call_next(request)
        except Exception:
            metrics.record_status(request.url.path, 500)
            raise
        metrics.record_status(request.url.path, response.status_code)
        return response

    def ready() -> tuple[TeacherEngine, DynamicBatcher]:
        if state.engine is None or state.batcher is None:
            raise ApiError(503, "starting", "the engine is still loading")
        return state.engine, state.batcher

    @app.post(
        "/v1/score",
        summary="Logprob of every token from `start` on, per sequence",
        response_model=ScoreResponse,
        responses=SCORE_ERRORS,
    )
    async def score(request: Request) -> Response:
        began = time.monotonic()
        engine_, batcher = ready()
        body = await read_body(request, ScoreRequest, config)
        info = engine_.info()
        validate_request(body, info, config)
        scores = await score_through_cache(body, info.revision, cache, batcher, metrics)
        if config.inject_latency_ms:
            await asyncio.sleep(config.inject_latency_ms / 1000)
        metrics.sequences.inc(len(scores))
        metrics.tokens_scored.inc(sum(len(s.logprobs) for s in scores))
        metrics.latency.observe(time.monotonic() - began)
        return respond(
            request, ScoreResponse(model=info.model, revision=info.revision, scores=scores)
        )

    @app.get(
        "/v1/info",
        summary="Model id, weights revision, vocab size, tokenizer fingerprint, max length",
        response_model=ServerInfo,
        responses={401: SCORE_ERRORS[401], 503: SCORE_ERRORS[503]},
    )
    async def info(request: Request) -> Response:
        return respond(request, ready()[0].info())

    document_bodies(app, {"/v1/score": ScoreRequest})
    return app
