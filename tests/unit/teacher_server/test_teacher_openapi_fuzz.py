"""Fuzz the teacher API from its own OpenAPI description (schemathesis): whatever the
body, JSON or msgpack, the server answers with a documented status and shape, never 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import ThreadedServer


def _packable(value: Any) -> Any:
    """msgpack holds 64-bit integers; bigger generated ones travel as floats."""
    if isinstance(value, list):
        return [_packable(v) for v in value]
    if isinstance(value, dict):
        return {k: _packable(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


@schemathesis.serializer("application/msgpack")
def _to_msgpack(ctx: Any, value: Any) -> bytes:
    return bytes(msgpack.packb(_packable(value), use_bin_type=True))


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
    operation = teacher_api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def conforms(case: schemathesis.Case) -> None:
        # Schema-valid is not always acceptable here: ids past the vocabulary, `start` past
        # the end and lengths over max_model_len depend on the loaded model (precise 422s).
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    conforms()
