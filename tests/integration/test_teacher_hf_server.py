"""Two real `rlad serve-teacher --backend hf` replicas behind a bearer token: exact
logprobs, concurrency, the `rlad query-teacher` command, auth, and a replica killed mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.clients.teacher import TeacherClient
from services.common.protocol import ScoreResponse
from services.launch.processes import ManagedProcess
from tests.teacher_support import (
    RLAD,
    Reference,
    assert_logprobs_close,
    random_sequences,
    start_teacher,
)

pytestmark = pytest.mark.slow  # two server start-ups and a fail-over run: about a minute

API_KEY = "integration-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def teachers(
    tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[ManagedProcess, str]]]:
    logs = tmp_path_factory.mktemp("teacher-logs")
    args = ("--backend", "hf", "--dtype", "float32", "--max-model-len", "512")
    env = {"RLAD_API_KEY": API_KEY}
    started = []
    try:
        for _ in range(2):
            started.append(start_teacher(tiny_teacher, logs, *args, env=env))
        yield started
    finally:
        for proc, _ in started:
            proc.stop()


@pytest.fixture(scope="module")
def reference(tiny_teacher: Path) -> Reference:
    return Reference(tiny_teacher)


def test_scores_equal_a_local_forward_pass_with_top_k(
    teachers: list[tuple[ManagedProcess, str]], reference: Reference
) -> None:
    sequences = random_sequences(12, seed=100, max_len=120)

    async def run() -> ScoreResponse:
        async with TeacherClient([url for _, url in teachers], api_key=API_KEY) as client:
            return await client.score(sequences, top_k=5)

    response = asyncio.run(run())
    for seq, scores in zip(sequences, response.scores, strict=True):
        assert_logprobs_close(scores.logprobs, reference.logprobs(seq))
        assert scores.top_k_ids == reference.log_softmax(seq).topk(5, dim=-1).indices.tolist()


def test_requests_without_the_token_are_refused(teachers: list[tuple[ManagedProcess, str]]) -> None:
    url = teachers[0][1]
    body = {"sequences": [{"token_ids": [1, 2, 3]}]}
    assert httpx.post(f"{url}/v1/score", json=body).status_code == 401
    bad = httpx.post(f"{url}/v1/score", content=b"{nope", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "malformed_body"
    assert httpx.post(f"{url}/v1/score", json=body, headers=AUTH).status_code == 200


def test_32_concurrent_clients_all_get_correct_answers(
    teachers: list[tuple[ManagedProcess, str]], reference: Reference
) -> None:
    url = teachers[0][1]
    work = {i: random_sequences(2, seed=200 + i) for i in range(32)}

    async def one_client(i: int) -> tuple[int, ScoreResponse]:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as http:
            body = {"sequences": [s.model_dump() for s in work[i]]}
            response = await http.post(f"{url}/v1/score", json=body)
            assert response.status_code == 200, response.text
            return i, ScoreResponse.model_validate_json(response.content)

    async def run() -> list[tuple[int, ScoreResponse]]:
        return await asyncio.gather(*(one_client(i) for i in range(32)))

    calls_before = _metric(url, "rlad_teacher_batch_requests_count")
    for i, response in asyncio.run(run()):
        for seq, scores in zip(work[i], response.scores, strict=True):
            assert_logprobs_close(scores.logprobs, reference.logprobs(seq))
    engine_calls = _metric(url, "rlad_teacher_batch_requests_count") - calls_before
    assert engine_calls < 32  # concurrent requests were coalesced into shared batches


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_rlad_score_command(
    teachers: list[tuple[ManagedProcess, str]], reference: Reference, tmp_path: Path
) -> None:
    sequences = random_sequences(3, seed=300)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(s.model_dump_json() + "\n" for s in sequences))
    done = subprocess.run(
        [RLAD, "query-teacher", "--url", teachers[0][1], "--input", str(source), "--top-k", "2"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "RLAD_API_KEY": API_KEY},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3 and all(len(line["top_k_ids"][0]) == 2 for line in lines)
    for seq, line in zip(sequences, lines, strict=True):
        assert_logprobs_close(line["logprobs"], reference.logprobs(seq))


def test_replica_killed_mid_run_every_request_still_answered_correctly(
    teachers: list[tuple[ManagedProcess, str]], reference: Reference
) -> None:
    """Last in the module: it kills one replica."""
    work = [random_sequences(random.Random(i).randint(1, 3), seed=400 + i) for i in range(40)]
    victim = teachers[1][0]

    async def run() -> list[ScoreResponse]:
        async with TeacherClient(
            [url for _, url in teachers], api_key=API_KEY, deadline_s=60, health_interval_s=0.5
        ) as client:

            async def request(i: int) -> ScoreResponse:
                await asyncio.sleep(0.05 * i)  # a steady stream across the kill
                return await client.score(work[i])

            async def kill_after_some_answers() -> None:
                await asyncio.sleep(0.6)
                victim.kill()

            killer = asyncio.create_task(kill_after_some_answers())
            responses = await asyncio.gather(*(request(i) for i in range(len(work))))
            await killer
            (dead,) = [r for r in client.replicas if r.url == teachers[1][1]]
            assert dead.last_failure != "never failed"
            return responses

    responses = asyncio.run(run())
    assert not victim.alive()
    for sequences, response in zip(work, responses, strict=True):
        for seq, scores in zip(sequences, response.scores, strict=True):
            assert_logprobs_close(scores.logprobs, reference.logprobs(seq))
