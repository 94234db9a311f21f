"""How `TeacherClient` speaks to one kind of teacher server: a `TeacherApi` per replica.

The client owns everything a kind of server does not change (splitting batches, picking a
replica, failover, circuit breakers, health checks, the deadline, backoff); an API owns
what it does change: how a request is encoded and an answer decoded, the paths, what a
refusal means and what to tell the operator. Two kinds exist, named by the teacher URL
(`services.config.workers.parse_teacher_url`):

- `RladApi`: an rlad teacher server (`POST /v1/score`, msgpack or JSON; `GET /v1/info`).
- `OpenAiApi` (services/clients/openai_teacher.py): an OpenAI-compatible server such as
  `vllm serve`, through `POST /v1/completions` with vLLM's `prompt_logprobs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import httpx
from pydantic import BaseModel

from services.common import wire
from services.common.http_server import API_KEY_ENV
from services.common.protocol import (
    TOP_K_OVER_LIMIT,
    ErrorBody,
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
    ServerInfo,
)

M = TypeVar("M")
B = TypeVar("B", bound=BaseModel)

SAME_KEY = f"the client's {API_KEY_ENV} does not match the teacher's: give both the same key"


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str  # from the replica's root URL
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiCall(Generic[M]):
    """One operation on one replica. `request` is the one whose refusals the client
    classifies; `extras` are sent to the same replica only once it answered 200, and
    `decode` gets their answers as they came (None where none came): information that
    is welcome but not required. `decode` raises `ValueError` on an answer that is not
    `answer` (named in the error)."""

    request: HttpCall
    answer: str
    decode: Callable[[httpx.Response, list[httpx.Response | None]], M]
    extras: tuple[HttpCall, ...] = ()


class TeacherApi(ABC):
    kind: ClassVar[str]
    health_path: ClassVar[str] = "/health"
    # Why a server refuses a request whatever sequences it carries, and how to fix it.
    refusal_hints: ClassVar[Mapping[int, str]]
    # What to check when a 200 answer is not what this API answers.
    invalid_answer_hint: ClassVar[str]

    @abstractmethod
    def score(self, request: ScoreRequest) -> ApiCall[ScoreResponse]:
        """Logprobs of tokens `start..` of every sequence (and the top-k when asked)."""

    @abstractmethod
    def info(self) -> ApiCall[ServerInfo]:
        """What the tokenizer and precision checks compare."""

    @abstractmethod
    def input_fault(self, response: httpx.Response) -> bool:
        """Whether a refusal blames the sequences sent (retrying them cannot help, other
        sequences may still be scored) rather than the server or the deployment."""

    def error_message(self, response: httpx.Response) -> str:
        return response.text[:300]


class RladApi(TeacherApi):
    """rlad's own teacher server (teacher_server/), msgpack bodies unless `binary` is off."""

    kind = "rlad"
    refusal_hints: ClassVar[Mapping[int, str]] = {
        400: "the teacher cannot read this client's requests: run one rlad version on both",
        401: SAME_KEY,
        403: SAME_KEY,
        404: "no teacher API at this URL: check --teacher-url / TEACHER_URLS (an "
        "OpenAI-compatible server is written openai+http://host:port/v1)",
        405: "no teacher API at this URL: check --teacher-url / TEACHER_URLS",
        415: "the teacher cannot read this client's requests: run one rlad version on both",
    }
    invalid_answer_hint = "check that the URL serves an rlad teacher of the client's version"

    def __init__(self, binary: bool = True) -> None:
        self.binary = binary
        content_type = wire.MSGPACK if binary else wire.JSON
        self.headers = {"content-type": content_type, "accept": content_type}

    def score(self, request: ScoreRequest) -> ApiCall[ScoreResponse]:
        body = wire.encode(request) if self.binary else request.model_dump_json().encode()
        return ApiCall(
            HttpCall("POST", "/v1/score", body, self.headers),
            "ScoreResponse",
            lambda response, _: _decode(response, ScoreResponse),
        )

    def info(self) -> ApiCall[ServerInfo]:
        return ApiCall(
            HttpCall("GET", "/v1/info", None, self.headers),
            "ServerInfo",
            lambda response, _: _decode(response, ServerInfo),
        )

    def input_fault(self, response: httpx.Response) -> bool:
        # 413 for a part the client then splits, or for one sequence alone; a top_k over the
        # server's limit refuses every request alike: the deployment's to fix
        if response.status_code not in (413, 422):
            return False
        error = _error(response)
        return error is None or error.type != TOP_K_OVER_LIMIT

    def error_message(self, response: httpx.Response) -> str:
        error = _error(response)
        return error.message if error is not None else super().error_message(response)


def _error(response: httpx.Response) -> ErrorBody | None:
    """The error an rlad server answered with; None for a body of another shape."""
    try:
        return ErrorResponse.model_validate_json(response.content).error
    except ValueError:
        return None


def _decode(response: httpx.Response, cls: type[B]) -> B:
    """Raises `ValueError` (a pydantic or wire error) on a body that is not a valid `cls`."""
    if response.headers.get("content-type", "").startswith(wire.MSGPACK):
        return wire.decode(response.content, cls)
    return cls.model_validate_json(response.content)
