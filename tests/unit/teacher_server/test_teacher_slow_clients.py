"""Clients that are slow or hang up, against a served teacher: their connections are
closed or answered in bounded time, nothing is logged as an error or counted as a 500,
and `/health` answers within a second throughout."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.server_support import hang_up_mid_body, slow_body_times_out, slow_headers_are_cut_off
from tests.teacher_support import ThreadedServer


@pytest.fixture(scope="module")
def config(hf_config: TeacherServerConfig) -> TeacherServerConfig:
    return hf_config.model_copy(update={"header_timeout_s": 1.0, "body_timeout_s": 1.0})


@pytest.fixture(scope="module")
def url(config: TeacherServerConfig, hf_engine: HFTeacherEngine) -> Iterator[str]:
    with ThreadedServer(config, hf_engine) as server:
        yield server.url


def test_slow_headers_are_cut_off_at_the_header_deadline(
    url: str, config: TeacherServerConfig
) -> None:
    slow_headers_are_cut_off(url, "/v1/score", config.header_timeout_s)


def test_a_body_that_stalls_gets_408(url: str, config: TeacherServerConfig) -> None:
    slow_body_times_out(url, "/v1/score", config.body_timeout_s)


def test_a_hang_up_mid_body_is_no_error(url: str, caplog: pytest.LogCaptureFixture) -> None:
    hang_up_mid_body(url, "/v1/score")
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'rlad_teacher_requests_total{status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics
    assert 'rlad_teacher_errors_total{kind="client_disconnected"} 1.0' in metrics
