"""Admission by what a request costs, on a teacher with the default limits: short
sequences cost what they are (not a whole padding bucket), top-k entries count, and a
request whose answer no limit would bound is refused at once."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.protocol import ScoreSequence
from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.server_support import health_seconds
from tests.teacher_support import ThreadedServer

RNG = random.Random(0)


def sequences(count: int, length: int) -> list[dict[str, list[int]]]:
    return [{"token_ids": [RNG.randrange(128) for _ in range(length)]} for _ in range(count)]


@pytest.fixture(scope="module")
def default_engine(tiny_teacher: Path) -> HFTeacherEngine:
    """The tiny teacher with every limit at its default (length_bucket 64, 1024 positions)."""
    return HFTeacherEngine(TeacherServerConfig(model=str(tiny_teacher), backend="hf"))


@pytest.fixture(scope="module")
def url(default_engine: HFTeacherEngine) -> Iterator[str]:
    config = default_engine.config.model_copy(update={"cache_bytes": 0})
    with ThreadedServer(config, default_engine) as server:
        yield server.url


def seconds_to_score(url: str, body: dict[str, object]) -> float:
    began = time.monotonic()
    response = httpx.post(f"{url}/v1/score", json=body, timeout=300)
    assert response.status_code == 200, response.text[:300]
    return time.monotonic() - began


def test_the_cost_counts_padding_and_top_k_entries(default_engine: HFTeacherEngine) -> None:
    short = [ScoreSequence(token_ids=[1, 2])] * 10
    assert default_engine.cost(short, top_k=0) == 20  # below one bucket: a power of two
    assert default_engine.cost([ScoreSequence(token_ids=[1] * 65)], 0) == 128  # two buckets
    scored = ScoreSequence(token_ids=[1] * 10, start=4)  # 6 positions scored
    assert default_engine.cost([scored], top_k=5) == 16 + 6 * 5


def test_many_short_sequences_cost_what_their_tokens_do(url: str) -> None:
    """Two-token sequences (10,000 took 49 s) cost 20x as much per token as 64-token ones
    when each was padded to a whole 64-token bucket; 2,000 show it as well."""
    per_short_token = seconds_to_score(url, {"sequences": sequences(2_000, 2)}) / 4_000
    per_long_token = seconds_to_score(url, {"sequences": sequences(64, 64)}) / 4096
    assert per_short_token < 4 * per_long_token, (per_short_token, per_long_token)


def test_a_top_k_answer_no_limit_would_bound_is_refused_at_once(url: str) -> None:
    """top_k 64 on 64 x 1024 tokens: a 264 KB request that answered 96 MB after minutes,
    while smaller requests waited behind it."""
    body = {"sequences": sequences(64, 1024), "top_k": 64}
    began = time.monotonic()
    response = httpx.post(f"{url}/v1/score", json=body, timeout=300)
    assert time.monotonic() - began < 5
    assert response.status_code == 413, response.text[:300]
    message = response.json()["error"]["message"]
    assert f"{64 * 1024 + 64 * 64 * 1023} tokens of work" in message
    assert health_seconds(url) < 1.0
    assert seconds_to_score(url, {"sequences": sequences(1, 8), "top_k": 4}) < 5
