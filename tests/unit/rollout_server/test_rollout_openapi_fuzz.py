"""Fuzz the rollout API from its own OpenAPI description (schemathesis): whatever the
body, JSON or msgpack, generation and file updates answer with a documented status and
shape, never 5xx. Admission is tightened so that what is admitted samples quickly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis import GenerationMode

from rollout_server.versioned import VersionedEngine
from tests.openapi_fuzz import assert_conforms


@pytest.fixture(scope="module")
def rollout_api(
    rollout_url: str, served_engine: VersionedEngine
) -> Iterator[schemathesis.BaseSchema]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(served_engine.admission, "capacity", 1024)
        yield schemathesis.openapi.from_url(f"{rollout_url}/openapi.json")


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        ("/v1/generate", "POST", GenerationMode.POSITIVE),
        ("/v1/generate", "POST", GenerationMode.NEGATIVE),
        ("/v1/weights", "POST", GenerationMode.POSITIVE),
        ("/v1/weights", "POST", GenerationMode.NEGATIVE),
        ("/v1/info", "GET", GenerationMode.POSITIVE),  # no parameters: nothing to break
    ],
)
def test_rollout_api_conforms_to_its_schema(
    rollout_api: schemathesis.BaseSchema, path: str, method: str, mode: GenerationMode
) -> None:
    assert_conforms(rollout_api, path, method, mode, examples=30)
