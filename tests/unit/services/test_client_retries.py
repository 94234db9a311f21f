"""The clients' retries (services/clients/retry.py): `RolloutClient` and `TeacherClient`
against a scripted server on loopback. A 503 is retried and the 200 after it returned, a
refusal is raised at once (the teacher's as `TeacherRequestError` only when the input is at
fault), a server that refuses connections is given up at the deadline, and a weight update
whose answer was cut off is judged by what the server then serves.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import torch
from pydantic import BaseModel

from services.clients.rollout import RolloutClient, RolloutServerError
from services.clients.teacher import TeacherClient, TeacherRequestError, TeacherUnavailable
from services.common.protocol import (
    TOP_K_OVER_LIMIT,
    ErrorBody,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
)
from services.common.runtime import free_port
from tests.server_support import ScriptedServer

GENERATED = GenerateResponse(policy_version=3, results=[])
SCORED = ScoreResponse(model="teacher", revision="r1", scores=[SequenceScores(logprobs=[-0.5])])


def generate_request() -> GenerateRequest:
    return GenerateRequest(prompts=[[5, 6, 7]])


def test_rollout_client_retries_a_503() -> None:
    async def run() -> None:
        async with (
            ScriptedServer([503, 503], GENERATED) as server,
            RolloutClient(server.url, backoff_s=0.01) as client,
        ):
            assert await client.generate(generate_request()) == GENERATED
        assert server.requests == ["/v1/generate"] * 3

    asyncio.run(run())


def test_rollout_client_does_not_retry_a_400() -> None:
    async def run() -> None:
        async with (
            ScriptedServer([400], GENERATED) as server,
            RolloutClient(server.url, backoff_s=0.01) as client,
        ):
            with pytest.raises(RolloutServerError) as caught:
                await client.generate(generate_request())
        assert (caught.value.status, caught.value.type) == (400, "scripted")
        assert server.requests == ["/v1/generate"]

    asyncio.run(run())


def test_rollout_client_gives_up_at_its_deadline() -> None:
    async def run() -> None:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        async with RolloutClient(url, deadline_s=0.5, backoff_s=0.05) as client:
            began = time.monotonic()
            with pytest.raises(RolloutServerError) as caught:
                await client.info()
            assert time.monotonic() - began < 0.5  # no wait that would end past it
        assert (caught.value.url, caught.value.status, caught.value.type) == (
            url,
            503,
            "unavailable",
        )
        assert "GET /v1/info failed until the deadline: ConnectError" in str(caught.value)

    asyncio.run(run())


def test_teacher_client_retries_a_503() -> None:
    async def run() -> None:
        async with (
            ScriptedServer([503], SCORED) as server,
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            response = await client.score([ScoreSequence(token_ids=[1, 2], start=1)])
            assert response == SCORED
        assert server.requests == ["/v1/score"] * 2

    asyncio.run(run())


def test_teacher_client_does_not_retry_an_invalid_input() -> None:
    async def run() -> None:
        async with (
            ScriptedServer([422], SCORED) as server,
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            with pytest.raises(TeacherRequestError, match="HTTP 422: scripted 422") as caught:
                await client.score([ScoreSequence(token_ids=[1, 2], start=1)])
            assert caught.value.status == 422
            assert client.replicas[0].failures == 0
        assert server.requests == ["/v1/score"]

    asyncio.run(run())


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (400, "the teacher cannot read this client's requests: run one rlad version on both"),
        (401, "the client's RLAD_API_KEY does not match the teacher's: give both the same key"),
        (403, "the client's RLAD_API_KEY does not match the teacher's: give both the same key"),
        (404, "no teacher API at this URL: check --teacher-url / TEACHER_URLS"),
        (405, "no teacher API at this URL: check --teacher-url / TEACHER_URLS"),
        (418, "see the teacher's log"),
    ],
)
def test_teacher_client_reports_a_teacher_that_refuses_any_input_as_unavailable(
    status: int, hint: str
) -> None:
    async def run() -> None:
        async with (
            ScriptedServer([status], SCORED) as server,
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            began = time.monotonic()
            with pytest.raises(TeacherUnavailable) as caught:
                await client.score([ScoreSequence(token_ids=[1, 2], start=1)])
            assert time.monotonic() - began < 5.0  # at once, not at the 60 s deadline
        assert f"{server.url}: HTTP {status}: scripted {status}: {hint}" in str(caught.value)
        assert server.requests == ["/v1/score"]

    asyncio.run(run())


def test_teacher_client_takes_a_top_k_over_the_limit_as_the_deployments_fault() -> None:
    """Told by the error's type, whatever its message: the 422 that
    `test_teacher_client_does_not_retry_an_invalid_input` blames on the sequences is, as
    `top_k_over_limit`, refused whatever they carry, so no group is dead-lettered for it."""

    async def run() -> None:
        async with (
            ScriptedServer([422], SCORED, error_type=TOP_K_OVER_LIMIT) as server,
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            with pytest.raises(TeacherUnavailable, match="HTTP 422: scripted 422"):
                await client.score([ScoreSequence(token_ids=[1, 2], start=1)], top_k=4)
        assert server.requests == ["/v1/score"]

    asyncio.run(run())


PAIR = ScoreSequence(token_ids=[1, 2], start=1)


@pytest.mark.parametrize(
    ("body", "request_", "why"),
    [
        (
            GENERATED,
            [PAIR],
            "not a valid ScoreResponse (model: Field required (and 4 more problems))",
        ),
        (SCORED, [PAIR, PAIR], "not a valid ScoreResponse (1 scores for 2 sequences)"),
        (
            SCORED,
            [ScoreSequence(token_ids=[1, 2, 3], start=1)],
            "not a valid ScoreResponse (scores[0] has 1 logprobs for 2 scored tokens)",
        ),
    ],
    ids=["not-a-score-response", "too-few-scores", "too-few-logprobs"],
)
def test_teacher_client_reports_a_garbled_answer_as_unavailable(
    body: BaseModel, request_: list[ScoreSequence], why: str
) -> None:
    async def run() -> None:
        async with (
            ScriptedServer([], body) as server,
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            with pytest.raises(TeacherUnavailable, match=re.escape(why)):
                await client.score(request_)
        assert server.requests == ["/v1/score"]

    asyncio.run(run())


class CutOffOnce:
    """A raw HTTP server whose first weight update is cut off after the request arrives
    (the update applied, its answer lost); then it refuses the same version as already
    served (409) and reports it in `/v1/info`, as a rollout server does."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.updates = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(
            (
                int(line.split(":")[1])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        if head.startswith("POST"):
            self.updates += 1
            if self.updates == 1:
                writer.close()  # applied, and the answer never sent
                return
            status, body = (
                409,
                ErrorResponse(
                    error=ErrorBody(
                        type="version_conflict", message="version not above the served one"
                    )
                ).model_dump_json(),
            )
        else:
            info = {"role": "rollout", "model": "m", "revision": "r1", "backend": "hf"}
            info |= {"vocab_size": 10, "tokenizer_fingerprint": "f", "max_model_len": 8}
            status, body = 200, json.dumps(info | {"policy_version": self.version})
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}".encode()
        )
        await writer.drain()
        writer.close()


def test_a_weight_update_cut_off_after_it_was_applied_is_not_an_error() -> None:
    async def scenario() -> tuple[int, int]:
        server = CutOffOnce(version=3)
        listening = await asyncio.start_server(server.handle, "127.0.0.1", server.port)
        async with listening, RolloutClient(server.url, backoff_s=0.01) as client:
            weights = {"w": torch.zeros(2)}
            answer = await client.push_weights(weights, version=3)
        return answer.policy_version, server.updates

    assert asyncio.run(scenario()) == (3, 2)


def test_a_cut_off_weight_update_the_server_did_not_apply_still_fails() -> None:
    async def scenario() -> None:
        server = CutOffOnce(version=2)  # serves 2: the update to 3 was not applied
        listening = await asyncio.start_server(server.handle, "127.0.0.1", server.port)
        async with listening, RolloutClient(server.url, backoff_s=0.01) as client:
            await client.push_weights({"w": torch.zeros(2)}, version=3)

    with pytest.raises(RolloutServerError, match="409"):
        asyncio.run(scenario())
