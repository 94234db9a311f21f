"""Fuzzing a server from its own OpenAPI description (schemathesis), for both servers:
msgpack bodies as the servers read them, and one check that whatever the body, the
answer has a documented status and shape and is never a 5xx."""

from __future__ import annotations

from typing import Any

import msgpack
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode


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


def assert_conforms(
    api: schemathesis.BaseSchema, path: str, method: str, mode: GenerationMode, examples: int
) -> None:
    """`examples` generated calls of `method path`, each answered as documented."""
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    def conforms(case: schemathesis.Case) -> None:
        # Schema-valid is not always acceptable: what depends on the loaded model (ids past
        # the vocabulary, lengths over max_model_len) or on the server's state and limits
        # (versions, paths, admission) gets a precise 4xx.
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    conforms()
