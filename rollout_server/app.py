"""The rollout server's HTTP app: `create_app(config)` over a `RolloutEngine`.

    rlad serve-rollout --model path/to/student --backend vllm --port 8200
    curl -s localhost:8200/v1/generate -H 'content-type: application/json' \
        -d '{"prompts": [[5, 6, 7]], "sampling": {"n": 4, "max_tokens": 16, "seed": 1}}'

Weight updates (the trainer's `RolloutClient.push_weights` speaks both):
- `POST /v1/weights` with a `WeightUpdateRequest` naming a safetensors file or folder on a
  volume the server can read;
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
from collections.abc import AsyncIterator, Awaitable
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
from services.common.http_server import ApiError, check_auth, create_base_app, read_body, respond
from services.common.protocol import (
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


class _State:
    engine: RolloutEngine | None = None


def upload_request(request: Request) -> WeightUpdateRequest:
    """The `WeightUpdateRequest` an upload's headers describe."""
    raw_version = request.headers.get(VERSION_HEADER, "")
    if not raw_version.isdigit():
        raise ApiError(422, "invalid_request", f"header {VERSION_HEADER} must be a version >= 0")
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
    )

    def ready() -> RolloutEngine:
        if state.engine is None:
            raise ApiError(503, "starting", "the engine is still loading")
        return state.engine

    @app.post("/v1/generate", summary="Sample n completions per prompt")
    async def generate(request: Request) -> Response:
        began = time.monotonic()
        engine_ = ready()
        body = await read_body(request, GenerateRequest, config.max_body_bytes)
        try:
            result: GenerateResponse = await engine_.generate(body)
        except ApiError as exc:
            metrics.requests.labels(exc.type).inc()
            raise
        metrics.observe_generate(result, time.monotonic() - began)
        return respond(request, result)

    @app.get("/v1/info", summary="Model, policy version, tokenizer fingerprint, max length")
    async def info(request: Request) -> Response:
        server_info: ServerInfo = ready().info()
        return respond(request, server_info)

    async def run_update(transport: str, update: Awaitable[WeightUpdateResponse]) -> Response:
        try:
            result = await update
        except ApiError as exc:
            metrics.updates.labels(transport, exc.type).inc()
            raise
        metrics.observe_update(result)
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/v1/weights", summary="Load new weights from a shared volume")
    async def update_from_path(request: Request) -> Response:
        check_auth(request, required=not config.loopback_only)
        engine_ = ready()
        body = await read_body(request, WeightUpdateRequest, config.max_body_bytes)
        return await run_update("file", engine_.update_weights_from_path(body))

    @app.post("/v1/weights/upload", summary="Load new weights streamed in the body")
    async def update_from_upload(request: Request) -> Response:
        check_auth(request, required=not config.loopback_only)
        engine_ = ready()
        update = upload_request(request)
        return await run_update(
            "http", engine_.update_weights_from_upload(body_chunks(request), update)
        )

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
        await nccl.init(await read_body(request, NcclInitRequest, config.max_body_bytes))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/start", summary="Take the weights for an NCCL update")
    async def nccl_start(request: Request) -> Response:
        nccl = updates(request)
        await nccl.start(await read_body(request, NcclStartRequest, config.max_body_bytes))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/update", summary="Receive the tensors the trainer broadcasts")
    async def nccl_update(request: Request) -> Response:
        nccl = updates(request)
        await nccl.update(await read_body(request, NcclUpdateRequest, config.max_body_bytes))
        return Response(status_code=204)

    @app.post("/v1/weights/nccl/finish", summary="Verify the probe and commit the version")
    async def nccl_finish(request: Request) -> Response:
        nccl = updates(request)
        body = await read_body(request, NcclFinishRequest, config.max_body_bytes)
        result: WeightUpdateResponse = await nccl.finish(body)
        return Response(result.model_dump_json(), media_type="application/json")
