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
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from services.common import wire
from services.common.http_server import ApiError, create_base_app, read_body, respond
from services.common.protocol import (
    ErrorResponse,
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

SCORE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Body is not valid JSON / msgpack."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": ErrorResponse, "description": "Body or total tokens over the limit."},
    415: {"model": ErrorResponse, "description": "Content-Type is neither JSON nor msgpack."},
    422: {
        "model": ErrorResponse,
        "description": "Invalid request: names the sequence and index (empty, `start` out of "
        "range, id outside the vocabulary, longer than max_model_len, top_k too large).",
    },
    429: {"model": ErrorResponse, "description": "Queue full; see the Retry-After header."},
    503: {"model": ErrorResponse, "description": "Engine still loading."},
}


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


def _document_body(app: FastAPI, path: str, schema: type[ScoreRequest]) -> None:
    """Routes read their body themselves (JSON or msgpack); describe it in the OpenAPI doc."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            body = schema.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components[schema.__name__] = body
            ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {wire.JSON: {"schema": ref}, wire.MSGPACK: {"schema": ref}},
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
        body = await read_body(request, ScoreRequest, config.max_body_bytes)
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

    _document_body(app, "/v1/score", ScoreRequest)
    return app
