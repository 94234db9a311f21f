"""Fuzz the teacher API from its own OpenAPI description (schemathesis): whatever the
body, JSON or msgpack, the server answers with a documented status and shape, never 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis import GenerationMode

from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.openapi_fuzz import assert_conforms
from tests.teacher_support import ThreadedServer


@pytest.fixture(scope="module")
def teacher_api(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> Iterator[schemathesis.BaseSchema]:
    with ThreadedServer(hf_config, hf_engine) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        ("/v1/score", "POST", GenerationMode.POSITIVE),
        ("/v1/score", "POST", GenerationMode.NEGATIVE),
        ("/v1/info", "GET", GenerationMode.POSITIVE),  # no parameters: nothing to break
    ],
)
def test_teacher_api_conforms_to_its_schema(
    teacher_api: schemathesis.BaseSchema, path: str, method: str, mode: GenerationMode
) -> None:
    assert_conforms(teacher_api, path, method, mode, examples=30)
