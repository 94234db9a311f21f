"""`/v1/generate` of a served transformers engine: input its schema accepts but no model
can serve gets a precise 422 (never a 500), ids are taken strictly, admission counts the
work, a 500 is counted and never stalls the event loop, and an open server says so."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rollout_server.app import create_app
from rollout_server.versioned import VersionedEngine
from services.common.http_transport import warn_if_unprotected
from services.common.protocol import GenerateRequest, GenerateResponse, SamplingParams
from services.common.runtime import configure_logging
from services.config.servers import RolloutServerConfig
from tests.server_support import ThreadedServer, health_seconds


def generate(url: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=60)


def outcomes(url: str) -> dict[str, float]:
    """`rlad_rollout_requests_total` by outcome."""
    found = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("rlad_rollout_requests_total{"):
            label, value = line.split("} ")
            found[label.split('"')[1]] = float(value)
    return found


UNSERVABLE = [
    # (body, words of the 422's message)
    ({"prompt_texts": [""]}, "prompt_texts[0] encodes to no tokens"),
    ({"prompt_texts": ["ok", "\u0000"]}, "prompt_texts[1] encodes to no tokens"),
    ({"prompt_texts": ["\U0001f600", "中文", "e\u0301"]}, "3 such prompts"),
    ({"prompts": [[5, 6]], "sampling": {"temperature": 1e-45}}, "below 0.01"),
    ({"prompts": [[5, 6]], "sampling": {"top_k": 1000}}, "exceeds the vocabulary"),
    ({"prompts": [[5, 6]], "sampling": {"seed": 2**64}}, "sampling.seed"),
]


@pytest.mark.parametrize(("body", "words"), UNSERVABLE)
def test_input_the_schema_accepts_but_no_model_can_serve_gets_422(
    rollout_url: str, body: dict[str, Any], words: str
) -> None:
    response = generate(rollout_url, body)
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]["message"]


LENIENT = [
    {"prompts": [[True, False]]},
    {"prompts": [["5"]]},
    {"prompts": [[5.0]]},
    {"prompts": [[5]], "sampling": {"top_k": True}},
    {"prompts": [[5]], "sampling": {"n": "2"}},
]


@pytest.mark.parametrize("body", LENIENT)
def test_ids_and_counts_are_taken_strictly(rollout_url: str, body: dict[str, Any]) -> None:
    response = generate(rollout_url, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "invalid_request"


def test_media_types_are_case_insensitive(rollout_url: str) -> None:
    body = GenerateRequest(prompts=[[5, 6]], sampling=SamplingParams(max_tokens=2))
    response = httpx.post(
        f"{rollout_url}/v1/generate",
        content=body.model_dump_json(),
        headers={"content-type": "APPLICATION/JSON; Charset=UTF-8"},
    )
    assert response.status_code == 200, response.text
    GenerateResponse.model_validate_json(response.content)


# ---------------------------------------------------------------- admission


@pytest.fixture
def held(
    served_engine: VersionedEngine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[threading.Event]:
    """While unset, every generation of the served engine waits (holding its admission)."""
    gate = threading.Event()
    sample = served_engine._sample

    async def gated(*args: Any) -> Any:
        await asyncio.to_thread(gate.wait, 30)
        return await sample(*args)

    monkeypatch.setattr(served_engine, "_sample", gated)
    yield gate
    gate.set()


def test_admission_counts_n_times_the_completion_budget(
    rollout_url: str,
    served_engine: VersionedEngine,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    too_much = {"prompts": [[5, 6, 7]] * 4, "sampling": {"n": 256, "max_tokens": 200}}
    response = generate(rollout_url, too_much)  # 4 x (3 + 256 x 200) tokens: never fits
    assert response.status_code == 413, response.text
    assert "over the server's whole admission bound (4096)" in response.json()["error"]["message"]
    monkeypatch.setattr(served_engine.admission, "capacity", 600)  # small: quick to sample
    first = {"prompts": [[5, 6, 7]], "sampling": {"n": 2, "max_tokens": 200}}  # 403 tokens
    small = {"prompts": [[5]], "sampling": {"max_tokens": 4}}  # 5 tokens: still fits

    def admitted(tokens: int) -> None:
        deadline = time.monotonic() + 10
        while served_engine.admission.admitted != tokens:
            assert time.monotonic() < deadline, f"never {tokens} tokens admitted"
            time.sleep(0.02)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(generate, rollout_url, first)]
        admitted(403)
        running.append(pool.submit(generate, rollout_url, small))
        admitted(408)
        second = generate(rollout_url, {"prompts": [[5]], "sampling": {"max_tokens": 200}})
        assert second.status_code == 429, second.text  # 201 more tokens do not fit
        assert 1 <= int(second.headers["retry-after"]) <= 60
        assert "retry in" in second.json()["error"]["message"]
        held.set()
        assert [r.result().status_code for r in running] == [200, 200]
    assert served_engine.admission.admitted == 0
    assert outcomes(rollout_url)["overloaded"] >= 1


# ---------------------------------------------------------------- 500s


class DeepFailure:
    """The served engine asked to continue an empty prompt past every check: the error
    comes from deep inside transformers, as a real 500's does."""

    def __init__(self, engine: VersionedEngine) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        await self.engine._sample([[]], [4], request.sampling)
        raise AssertionError("unreachable: an empty prompt cannot be sampled")


@pytest.fixture
def production_logging() -> Iterator[None]:
    """The log handlers `rlad serve-rollout` installs (rich tracebacks), then the old ones."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("rollout")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_500_is_counted_and_never_stalls_the_event_loop(
    served_config: RolloutServerConfig, served_engine: VersionedEngine, production_logging: None
) -> None:
    app = create_app(served_config, DeepFailure(served_engine))  # type: ignore[arg-type]
    with ThreadedServer(app, served_config.header_timeout_s) as server:
        body = {"prompts": [[5, 6]], "sampling": {"max_tokens": 4}}
        with ThreadPoolExecutor(4) as pool:
            failing = [pool.submit(generate, server.url, body) for _ in range(4)]
            slowest = max(health_seconds(server.url) for _ in range(20))
            statuses = [f.result().status_code for f in failing]
        assert statuses == [500] * 4
        assert slowest < 1.0
        assert outcomes(server.url)["internal_error"] == 4


def test_an_open_server_warns_at_start(
    served_config: RolloutServerConfig,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RLAD_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        warn_if_unprotected(served_config)  # loopback: quiet
        assert not caplog.records
        warn_if_unprotected(served_config.model_copy(update={"host": "0.0.0.0"}))
    (record,) = caplog.records
    assert "bound to 0.0.0.0 without RLAD_API_KEY" in record.getMessage()
    caplog.clear()
    monkeypatch.setenv("RLAD_API_KEY", "k")
    warn_if_unprotected(served_config.model_copy(update={"host": "0.0.0.0"}))
    assert not caplog.records
