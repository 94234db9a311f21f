"""`TeacherClient` against teacher apps served on loopback: splitting, balancing,
failover, breakers, health checks, deadlines and its errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from services.clients.replicas import split_batches
from services.clients.teacher import (
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailable,
)
from services.clients.teacher_pools import verify_tokenizers
from services.common.protocol import TOP_K_OVER_LIMIT, ErrorResponse, ScoreSequence, ServerInfo
from services.common.runtime import free_port
from services.common.tokenizer_check import TokenizerMismatch
from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import Reference, ThreadedServer, assert_logprobs_close, random_sequences


@pytest.fixture(scope="module")
def replicas(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> Iterator[list[ThreadedServer]]:
    config = hf_config.model_copy(update={"cache_bytes": 0})
    with ThreadedServer(config, hf_engine) as a, ThreadedServer(config, hf_engine) as b:
        yield [a, b]


def _requests_served(server: ThreadedServer) -> float:
    prefix = 'rlad_teacher_requests_total{status="200"}'
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_split_batches_respects_token_and_sequence_limits() -> None:
    seqs = [ScoreSequence(token_ids=[1] * n) for n in (5, 5, 5, 12, 2, 2, 2)]
    chunks = split_batches(seqs, max_tokens=10, max_sequences=2)
    assert [[len(s.token_ids) for s in c] for c in chunks] == [[5, 5], [5], [12], [2, 2], [2]]
    assert [s for c in chunks for s in c] == seqs


def test_large_batch_is_split_balanced_and_returned_in_order(
    replicas: list[ThreadedServer], reference: Reference
) -> None:
    sequences = random_sequences(40, seed=30)
    before = [_requests_served(r) for r in replicas]

    async def run() -> None:
        async with TeacherClient([r.url for r in replicas], max_batch_sequences=4) as client:
            response = await client.score(sequences)
            for seq, scores in zip(sequences, response.scores, strict=True):
                assert_logprobs_close(scores.logprobs, reference.logprobs(seq))
            info = await client.info()
            assert info.revision == response.revision

    asyncio.run(run())
    served = [_requests_served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 10 and min(served) >= 2  # 10 chunks spread over both replicas


def test_dead_replica_fails_over_and_opens_its_breaker(replicas: list[ThreadedServer]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def run() -> None:
        urls = [dead, replicas[0].url]
        async with TeacherClient(urls, health_interval_s=0, breaker_open_s=600) as client:
            state = {r.url: r for r in client.replicas}[dead]
            for i in range(50):  # every request answered while the dead one collects failures
                assert len((await client.score(random_sequences(1, seed=40 + i))).scores) == 1
                if state.failures >= 3:
                    break
            assert state.failures == 3 and "ConnectError" in state.last_failure
            for i in range(10):  # breaker open: the dead replica is not tried any more
                await client.score(random_sequences(1, seed=90 + i))
            assert state.failures == 3

    asyncio.run(run())


def test_no_replica_answering_raises_naming_every_replica() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def run() -> None:
        async with TeacherClient(dead, deadline_s=1.0, health_interval_s=0) as client:
            began = time.monotonic()
            with pytest.raises(TeacherUnavailable) as caught:
                await client.score(random_sequences(1, seed=50))
            assert time.monotonic() - began < 5.0  # bounded by the deadline, never hangs
            for url in dead:
                assert f"{url}: ConnectError" in str(caught.value)

    asyncio.run(run())


def test_slow_replica_is_bypassed_and_the_deadline_holds(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine, replicas: list[ThreadedServer]
) -> None:
    slow_config = hf_config.model_copy(update={"inject_latency_ms": 3000.0})
    with ThreadedServer(slow_config, hf_engine) as slow:

        async def run() -> None:
            urls = [slow.url, replicas[0].url]
            async with TeacherClient(urls, request_timeout_s=1.0, health_interval_s=0) as client:
                for i in range(3):
                    assert (await client.score(random_sequences(1, seed=60 + i))).scores
            async with TeacherClient([slow.url], deadline_s=1.0, health_interval_s=0) as client:
                with pytest.raises(TeacherUnavailable, match="ReadTimeout"):
                    await client.score(random_sequences(1, seed=63))

        asyncio.run(run())


def test_invalid_request_is_not_retried_and_says_why(replicas: list[ThreadedServer]) -> None:
    async def run() -> None:
        async with TeacherClient([r.url for r in replicas], health_interval_s=0) as client:
            bad = [ScoreSequence(token_ids=[1, 2]), ScoreSequence(token_ids=[1, 500])]
            with pytest.raises(TeacherRequestError) as caught:
                await client.score(bad)
            assert caught.value.status == 422
            assert "sequences[1].token_ids[1] = 500" in str(caught.value)
            assert all(r.failures == 0 for r in client.replicas)

    asyncio.run(run())


def test_a_top_k_over_the_teachers_limit_blames_the_deployment_not_the_sequences(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> None:
    """Every request would be refused alike: the groups must wait for a fix, not be
    dead-lettered one by one as invalid."""
    capped = hf_config.model_copy(update={"max_top_k": 2, "cache_bytes": 0})
    with ThreadedServer(capped, hf_engine) as server:
        over = {"sequences": [{"token_ids": [1, 2, 3], "start": 1}], "top_k": 4}
        refusal = httpx.post(f"{server.url}/v1/score", json=over, timeout=30)
        assert refusal.status_code == 422
        assert ErrorResponse.model_validate_json(refusal.content).error.type == TOP_K_OVER_LIMIT

        async def run() -> None:
            async with TeacherClient([server.url], health_interval_s=0, deadline_s=5) as client:
                with pytest.raises(TeacherUnavailable, match="raise this server's --max-top-k"):
                    await client.score([ScoreSequence(token_ids=[1, 2, 3], start=1)], top_k=4)
                response = await client.score([ScoreSequence(token_ids=[1, 2, 3], start=1)], 2)
                assert response.scores[0].top_k_ids is not None

        asyncio.run(run())


def test_a_request_over_the_teachers_limit_is_split_and_a_lone_sequence_refused(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine, reference: Reference
) -> None:
    small = hf_config.model_copy(update={"max_request_tokens": 64, "cache_bytes": 0})
    sequences = random_sequences(8, seed=100, min_len=16, max_len=24)  # over 64 tokens
    with ThreadedServer(small, hf_engine) as server:

        async def run() -> None:
            async with TeacherClient([server.url], health_interval_s=0) as client:
                response = await client.score(sequences)  # sent in halves until each fits
                for seq, scores in zip(sequences, response.scores, strict=True):
                    assert_logprobs_close(scores.logprobs, reference.logprobs(seq))
                too_long = random_sequences(1, seed=101, min_len=80, max_len=100)
                with pytest.raises(TeacherRequestError, match="HTTP 413") as caught:
                    await client.score(too_long)
                assert caught.value.status == 413

        asyncio.run(run())


def test_api_key_is_sent_as_a_bearer_token(
    replicas: list[ThreadedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAD_API_KEY", "k3y")

    async def run() -> None:
        async with TeacherClient([replicas[0].url], health_interval_s=0) as client:  # from env
            assert (await client.score(random_sequences(1, seed=70))).scores
        async with TeacherClient([replicas[0].url], api_key="wrong", health_interval_s=0) as c:
            with pytest.raises(TeacherUnavailable, match=r"HTTP 401: .* give both the same key"):
                await c.score(random_sequences(1, seed=70))

    asyncio.run(run())


def test_health_checks_take_a_replica_out_and_back_in(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def wait_for(condition: object, what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    async def run() -> None:
        async with TeacherClient([url], health_interval_s=0.1, breaker_open_s=30) as client:
            (replica,) = client.replicas
            await wait_for(lambda: replica.down_by_health, "down replica not detected")
            assert "health check" in replica.last_failure
            with ThreadedServer(hf_config, hf_engine, port=port):
                await wait_for(lambda: not replica.down_by_health, "replica not taken back")
                assert (await client.score(random_sequences(1, seed=80))).scores

    asyncio.run(run())


class RenamedTokenizer:
    """An engine whose published tokenizer fingerprint differs."""

    def __init__(self, engine: HFTeacherEngine) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def info(self) -> ServerInfo:
        return self.engine.info().model_copy(update={"tokenizer_fingerprint": "0" * 16})


def test_verify_tokenizers_compares_both_servers(
    replicas: list[ThreadedServer], hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> None:
    async def run(student_url: str) -> ServerInfo:
        async with TeacherClient([replicas[0].url], health_interval_s=0) as client:
            (info,) = (await verify_tokenizers(client, student_url)).values()
            return info

    assert asyncio.run(run(replicas[1].url)).role == "teacher"
    renamed = RenamedTokenizer(hf_engine)
    with (
        ThreadedServer(hf_config, renamed) as other,  # type: ignore[arg-type]
        pytest.raises(TokenizerMismatch, match=r"teacher pool 'default': .*fingerprints"),
    ):
        asyncio.run(run(other.url))
