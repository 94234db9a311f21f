"""What every RLAD HTTP server shares: one error shape, JSON/msgpack bodies with a size
and time limit, optional bearer auth, and the `/health` + `/metrics` routes.

Servers build their app with `create_base_app(...)`, add their routes, read bodies with
`read_body(request, Schema, limits)`, answer with `respond(request, model)` and describe
the bodies they read themselves with `document_bodies`. Engines raise `ApiError` (or
plain `ValueError` for bad input) and never know about HTTP. How the app is served
(header timeout, the open-access warning) is `services.common.http_transport`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from services.common import wire
from services.common.protocol import ErrorBody, ErrorResponse, ServerInfo

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

API_KEY_ENV = "RLAD_API_KEY"
PROBES = ("/health", "/metrics")  # open to all, and not counted as requests in flight
# No client hears this answer (nginx's "client closed request"); it keeps metrics honest.
CLIENT_CLOSED = 499
# Frames of an unhandled error's traceback that are logged: enough to find the fault,
# short enough that writing it never holds up the event loop.
TRACEBACK_FRAMES = 12


class BodyLimits(Protocol):
    """What `read_body` needs of a server's settings (`ServerConfig` has both)."""

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def body_timeout_s(self) -> float: ...


class ApiError(Exception):
    """An error with an HTTP status, a machine-readable type and a helpful message."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.detail = detail
        self.headers = headers


def error_response(
    status: int,
    type_: str,
    message: str,
    detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(type=type_, message=message, detail=detail))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _validation_detail(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
        for err in exc.errors()
    ]


def short_traceback(exc: BaseException) -> str:
    """The last frames of `exc`'s traceback as plain text, for logging on the event loop.

    Log it as a string, not with exc_info: a rich log handler renders every frame of a
    traceback with syntax highlighting, which held the event loop for seconds per error.
    """
    return "".join(traceback.format_exception(exc, limit=-TRACEBACK_FRAMES))


def error_type(exc: BaseException) -> str:
    """The `type` the error handlers answer `exc` with (metrics count outcomes by it)."""
    if isinstance(exc, ApiError):
        return exc.type
    if isinstance(exc, ValidationError | RequestValidationError | ValueError):
        return "invalid_request"
    return "internal_error"


def _summarise(detail: list[dict[str, Any]]) -> str:
    where, _, what = wire.summarise_errors(detail).partition(": ")
    return f"invalid request at `{where}`: {what}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods answer in the one error shape too.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, kind, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        return error_response(422, "invalid_request", _summarise(detail), detail)

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        return error_response(422, "invalid_request", _summarise(detail), detail)

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error in %s %s\n%s", request.method, request.url.path, short_traceback(exc)
        )
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


async def read_bytes(request: Request, limits: BodyLimits) -> bytes:
    """The request body, refusing anything over `max_body_bytes` (413, without buffering it
    all) or slower than `body_timeout_s` (408); 499 when the client hangs up mid-body."""
    max_bytes = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413, "too_large", f"body of {declared} bytes exceeds the limit of {max_bytes} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(
                        413,
                        "too_large",
                        f"body exceeds the limit of {max_bytes} bytes; split the batch",
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {limits.body_timeout_s:g}s ({size} bytes came)",
            headers={"connection": "close"},  # the rest of the body must not be parsed as a request
        ) from None
    except ClientDisconnect:
        raise ApiError(
            CLIENT_CLOSED, "client_disconnected", "the client hung up before sending its body"
        ) from None
    return b"".join(chunks)


async def read_body(request: Request, cls: type[M], limits: BodyLimits) -> M:
    """Parse a JSON or msgpack body (by Content-Type) into `cls`; 400/408/413/415/422 on bad
    input."""
    data = await read_bytes(request, limits)
    # Media types are case-insensitive (RFC 9110 8.3.1).
    content_type = request.headers.get("content-type", wire.JSON).split(";")[0].strip().lower()
    if content_type == wire.MSGPACK:
        try:
            raw = wire.decode_raw(data)
        except wire.WireDecodeError as exc:
            raise ApiError(400, "malformed_body", str(exc)) from exc
        return cls.model_validate(raw)
    if content_type not in (wire.JSON, ""):
        raise ApiError(
            415, "unsupported_media_type", f"send {wire.JSON} or {wire.MSGPACK}, not {content_type}"
        )
    try:
        return cls.model_validate_json(data)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise ApiError(
                400, "malformed_body", f"body is not valid JSON: {exc.errors()[0]['msg']}"
            ) from exc
        raise


def error_docs(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each status (-> when it is answered) in the one error shape."""
    return {
        status: {"model": ErrorResponse, "description": when}
        for status, when in descriptions.items()
    }


def document_bodies(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """Routes read their body themselves (JSON or msgpack): put each POST route's body
    schema (`bodies`: path -> model) into the app's OpenAPI description."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, schema in bodies.items():
                body = schema.model_json_schema(ref_template="#/components/schemas/{model}")
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


def respond(request: Request, model: BaseModel) -> Response:
    """Answer in msgpack when the client accepts it, JSON otherwise."""
    if wire.MSGPACK in request.headers.get("accept", ""):
        return Response(wire.encode(model), media_type=wire.MSGPACK)
    return Response(model.model_dump_json(), media_type=wire.JSON)


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def check_auth(request: Request, *, required: bool) -> None:
    """401 unless the bearer token matches `RLAD_API_KEY` (when set, or when `required`)."""
    expected = api_key()
    if expected is None:
        if required:
            raise ApiError(
                401,
                "unauthorized",
                f"this endpoint needs a bearer token: set {API_KEY_ENV} on the server and client",
            )
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise ApiError(401, "unauthorized", f"missing or wrong bearer token (see {API_KEY_ENV})")


def create_base_app(
    *,
    title: str,
    description: str,
    registry: CollectorRegistry,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    is_ready: Callable[[], bool],
    info: Callable[[], ServerInfo] | None = None,
) -> FastAPI:
    """A FastAPI app with the shared error handlers, auth middleware, `/health`, `/metrics`.

    `app.state` carries what serving the app needs (services.common.http_transport):
    `is_ready`, `info` (the server's `ServerInfo`, for its registration), `draining` (set
    when it stops: `/health` then answers 503 so that clients take it out) and `in_flight`
    (requests being answered, probes aside)."""
    app = FastAPI(title=title, description=description, lifespan=lifespan)
    app.state.is_ready = is_ready
    app.state.info = info
    app.state.draining = False
    app.state.in_flight = 0
    install_error_handlers(app)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Any]) -> Response:
        # /health and /metrics stay open so orchestrators and Prometheus can probe them.
        if request.url.path in PROBES:
            probe: Response = await call_next(request)
            return probe
        try:
            check_auth(request, required=False)
        except ApiError as exc:
            return error_response(exc.status, exc.type, exc.message)
        app.state.in_flight += 1
        try:
            response: Response = await call_next(request)
        finally:
            app.state.in_flight -= 1
        return response

    @app.get("/health", summary="Liveness and readiness")
    async def health() -> Response:
        if app.state.draining:
            return error_response(503, "draining", "the server is stopping: send elsewhere")
        if not is_ready():
            return error_response(503, "starting", "the engine is still loading")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
