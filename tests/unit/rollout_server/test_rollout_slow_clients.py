"""Clients that are slow or hang up, against the served rollout engine: their connections
are closed or answered in bounded time, nothing is logged as an error or counted as a
500, and `/health` answers within a second throughout."""

from __future__ import annotations

import httpx
import pytest

from services.config.servers import RolloutServerConfig
from tests.server_support import hang_up_mid_body, slow_body_times_out, slow_headers_are_cut_off


def test_slow_headers_are_cut_off_at_the_header_deadline(
    rollout_url: str, served_config: RolloutServerConfig
) -> None:
    slow_headers_are_cut_off(rollout_url, "/v1/generate", served_config.header_timeout_s)


def test_a_body_that_stalls_gets_408(rollout_url: str, served_config: RolloutServerConfig) -> None:
    slow_body_times_out(rollout_url, "/v1/generate", served_config.body_timeout_s)


def test_a_hang_up_mid_body_is_no_error(rollout_url: str, caplog: pytest.LogCaptureFixture) -> None:
    hang_up_mid_body(rollout_url, "/v1/generate")
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    metrics = httpx.get(f"{rollout_url}/metrics").text
    assert 'rlad_rollout_requests_total{outcome="client_disconnected"}' in metrics
    assert 'outcome="internal_error"' not in metrics
