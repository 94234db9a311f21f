"""The rollout server's HTTP app: `create_app(config)` over a `RolloutEngine`.

    rlad serve-rollout --model path/to/student --backend vllm --port 8200
    curl -s localhost:8200/v1/generate -H 'content-type: application/json' \
        -d '{"prompts": [[5, 6, 7]], "sampling": {"n": 4, "max_tokens": 16, "seed": 1}}'

Weight updates (the trainer's `RolloutClient.push_weights` speaks both):
- `POST /v1/weights` with a `WeightUpdateRequest` naming a safetensors file or folder
  inside the server's `weights_dir` (on a volume both sides can read);
- `POST /v1/weights/upload` with the safetensors file itself as the body
  (`application/octet-stream`), the version in `X-RLAD-Policy-Version`, its sha256 in
  `X-RLAD-SHA256` and an optional `WeightProbe` as JSON in `X-RLAD-Probe`.
Both answer `WeightUpdateResponse` only once the new weights serve and passed every
check; any failure is a 4xx/5xx naming the reason, and the old weights keep serving.
They need the bearer token unless the server is bound to loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect

from rollout_server.backends import load_engine
from rollout_server.metrics import RolloutMetrics
from rollout_server.rollout_engine import RolloutEngine
from rollout_server.staging import UPLOAD_FILE
from services.common.http_server import (
    ApiError,
    check_auth,
    create_base_app,
    document_bodies,
    error_docs,
    error_type,
    read_body,
    respond,
)
from services.common.protocol import (
    INT64_MAX,
    GenerateRequest,
    GenerateResponse,
    NcclFinishRequest,
    NcclInitRequest,
    NcclStartRequest,
    NcclUpdateRequest,
    ServerInfo,
    WeightProbe,
    WeightUpdateRequest,
    WeightUpdateResponse,
)
from services.config.servers import RolloutServerConfig

DESCRIPTION = """Samples completions with the current student weights and accepts
versioned, verified weight updates. Bodies are JSON or msgpack (`application/msgpack`);
send `Accept: application/msgpack` to get msgpack back. Every response of
`/v1/generate` carries the `policy_version` that produced all of its tokens."""

VERSION_HEADER = "x-rlad-policy-version"
SHA256_HEADER = "x-rlad-sha256"
PROBE_HEADER = "x-rlad-probe"

ERRORS = {
    400: "Body is not valid JSON / msgpack, or a weight upload is malformed or corrupted.",
    401: "Missing or wrong bearer token.",
    403: "A file update names a path outside the server's weights_dir.",
    408: "The body did not arrive in time.",
    409: "The update's version is not above the serving one.",
    413: "Body, sequences or the work they ask for over the limit.",
    415: "Content-Type is neither JSON nor msgpack.",
    422: "Invalid request: names the field and the problem (ids outside the vocabulary, a "
    "prompt that encodes to no tokens, weights that do not fit the model or are not finite).",
    429: "Admission bound full; see the Retry-After header.",
    503: "Engine still loading, or no verified weights to serve.",
}
GENERATE_ERRORS = error_docs({s: ERRORS[s] for s in (400, 401, 408, 413, 415, 422, 429, 503)})
WEIGHTS_ERRORS = error_docs({s: ERRORS[s] for s in (400, 401, 403, 408, 409, 413, 415, 422, 503)})


class _State:
    engine: RolloutEngine | None = None


def upload_request(request: Request) -> WeightUpdateRequest:
    """The `WeightUpdateRequest` an upload's headers describe."""
    raw_version = request.headers.get(VERSION_HEADER, "")
    if not (raw_version.isascii() and raw_version.isdigit() and int(raw_version) <= INT64_MAX):
        raise ApiError(
            422,
            "invalid_request",
            f"header {VERSION_HEADER} must be a version from 0 to {INT64_MAX} (int64)",
        )
    digest = request.headers.get(SHA256_HEADER)
    probe = request.headers.get(PROBE_HEADER)
    return WeightUpdateRequest(
        version=int(raw_version),
        sha256={UPLOAD_FILE: digest} if digest else None,
        probe=WeightProbe.model_validate_json(probe) if probe else None,
    )


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "truncated_upload", "the client disconnected mid-upload") from None


def create_app(config: RolloutServerConfig, engine: RolloutEngine | None = None) -> FastAPI:
    """The app; loads the engine the config names at start-up unless one is passed in."""
    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)
    state = _State()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine = (
            engine if engine is not None else await asyncio.to_thread(load_engine, config)
        )
        metrics.policy_version.set(state.engine.info().policy_version or 0)
        try:
            yield
        finally:
            if engine is None:
                state.engine.shutdown()
            state.engine = None

    app = create_base_app(
        title="RLAD rollout server",
        description=DESCRIPTION,
        registry=registry,
        lifespan=lifespan,
        is_ready=lambda: state.engine is not None,
        info=lambda: ready().info(),
    )

    def ready() -> RolloutEngine:
        if state.engine is None:
            raise ApiError(503, "starting", "the engine is still loading")
        return state.engine

    @app.post(
        "/v1/generate",
        summary="Sample n completions per prompt",
        response_model=GenerateResponse,
        responses=GENERATE_ERRORS,
    )
    async def generate(request: Request) -> Response:
        began = time.monotonic()
        try:
            engine_ = ready()
            body = await read_body(request, GenerateRequest, config)
            result: GenerateResponse = await engine_.generate(body)
        except Exception as exc:  # every outcome is counted, 500s included
            metrics.requests.labels(error_type(exc)).inc()
            raise
        metrics.observe_generate(result, time.monotonic() - began)
        return respond(request, result)

    @app.get(
        "/v1/info",
        summary="Model, policy version, tokenizer fingerprint, max length",
        response_model=ServerInfo,
        responses=error_docs({s: ERRORS[s] for s in (401, 503)}),
    )
    async def info(request: Request) -> Response:
        server_info: ServerInfo = ready().info()
        return respond(request, server_info)

    async def run_update(
        transport: str, update: Callable[[], Awaitable[WeightUpdateResponse]]
    ) -> Response:
        try:
            result = await update()
        except Exception as exc:
            metrics.updates.labels(transport, error_type(exc)).inc()
            raise
        metrics.observe_update(result)
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post(
        "/v1/weights",
        summary="Load new weights from a file or folder inside weights_dir",
        response_model=WeightUpdateResponse,
        responses=WEIGHTS_ERRORS,
    )
    async def update_from_path(request: Request) -> Response:
        async def update() -> WeightUpdateResponse:
            check_auth(request, required=not config.loopback_only)
            engine_ = ready()
            body = await read_body(request, WeightUpdateRequest, config)
            return await engine_.update_weights_from_path(body)

        return await run_update("file", update)

    @app.post(
        "/v1/weights/upload",
        summary="Load new weights streamed in the body",
        response_model=WeightUpdateResponse,
        responses=WEIGHTS_ERRORS,
    )
    async def update_from_upload(request: Request) -> Response:
        async def update() -> WeightUpdateResponse:
            check_auth(request, required=not config.loopback_only)
            engine_ = ready()
            body = upload_request(request)
            return await engine_.update_weights_from_upload(body_chunks(request), body)

        return await run_update("http", update)

    document_bodies(app, {"/v1/generate": GenerateRequest, "/v1/weights": WeightUpdateRequest})
    if config.nccl_weight_transfer:
        add_nccl_routes(app, config, ready)
    return app


def add_nccl_routes(app: FastAPI, config: RolloutServerConfig, ready: Any) -> None:
    """`/v1/weights/nccl/*`: the control plane of vLLM's NCCL transfer (GPU servers only)."""

    from rollout_server.nccl import NcclUpdates  # imports CUDA-only vLLM code: here alone

    # One control plane for the engine's lifetime (the config allows NCCL with vLLM only).
    held: list[NcclUpdates] = []

    def updates(request: Request) -> NcclUpdates:
        check_auth(request, required=not config.loopback_only)
        if not held:
            held.append(NcclUpdates(ready()))
        return held[0]

    @app.post("/v1/weights/nccl/init", summary="Join the trainer's NCCL group")
    async def nccl_init(request: Request) -> Response:
        nccl = updates(request)
        await nccl.init(await read_body(request, NcclInitRequest, config))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/start", summary="Take the weights for an NCCL update")
    async def nccl_start(request: Request) -> Response:
        nccl = updates(request)
        await nccl.start(await read_body(request, NcclStartRequest, config))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/update", summary="Receive the tensors the trainer broadcasts")
    async def nccl_update(request: Request) -> Response:
        nccl = updates(request)
        await nccl.update(await read_body(request, NcclUpdateRequest, config))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/finish", summary="Verify the probe and commit the version")
    async def nccl_finish(request: Request) -> Response:
        nccl = updates(request)
        body = await read_body(request, NcclFinishRequest, config)
        result: WeightUpdateResponse = await nccl.finish(body)
        return Response(result.model_dump_json(), media_type="application/json")
