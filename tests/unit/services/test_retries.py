"""The retry policy shared by the clients and the scorer (services/clients/retry.py).

`RolloutClient` and `TeacherClient` against a scripted server on loopback: a 503 is
retried and the 200 after it returned, a refusal is raised at once (the teacher's as
`TeacherRequestError` only when the input is at fault), a server that refuses connections
is given up at the deadline. The scorer retries while no teacher can score, leaves the
groups pending when it is stopped (even mid-call) or hits an unexpected error, and then
retries them one at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from types import TracebackType

import pytest
import redis
import torch
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel

from services.clients.rollout import RolloutClient, RolloutServerError
from services.clients.teacher import TeacherClient, TeacherRequestError, TeacherUnavailable
from services.common.protocol import (
    CompletionRecord,
    ErrorBody,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    RolloutGroup,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
)
from services.common.runtime import free_port
from services.common.wire import decode
from services.config.workers import QueueConfig, ScorerConfig
from services.queue.connection import connect_async
from services.queue.keys import DEAD, ROLLOUTS, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.workers import scorer as scorer_module
from services.workers.scorer import Scorer

GENERATED = GenerateResponse(policy_version=3, results=[])
SCORED = ScoreResponse(model="teacher", revision="r1", scores=[SequenceScores(logprobs=[-0.5])])


class ScriptedServer:
    """Answers each request with the next scripted status, then 200 with `body`; records
    the path of every request. Runs under uvicorn on the test's event loop."""

    def __init__(self, statuses: list[int], body: BaseModel) -> None:
        self.statuses = list(statuses)
        self.body = body
        self.requests: list[str] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        app = FastAPI()
        app.add_api_route("/{path:path}", self.answer, methods=["GET", "POST"])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def answer(self, path: str) -> Response:
        self.requests.append(f"/{path}")
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            return Response(self.body.model_dump_json(), media_type="application/json")
        error = ErrorResponse(error=ErrorBody(type="scripted", message=f"scripted {status}"))
        return Response(
            error.model_dump_json(),
            status_code=status,
            media_type="application/json",
            headers={"retry-after": "0"},
        )

    async def __aenter__(self) -> ScriptedServer:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


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


class FlakyTeacher:
    """No teacher answers for the first `unavailable` calls (or until told to stop)."""

    def __init__(self, unavailable: int) -> None:
        self.unavailable = unavailable
        self.calls = 0

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        if self.calls <= self.unavailable:
            raise TeacherUnavailable("no teacher replica answered")
        return ScoreResponse(
            model="teacher",
            revision="r1",
            scores=[
                SequenceScores(logprobs=[-0.5] * (len(s.token_ids) - s.start)) for s in sequences
            ],
        )


def rollout_group() -> RolloutGroup:
    """Rewards that differ: a group the scorer must score (equal ones it would skip)."""
    return RolloutGroup(
        group_id="g0",
        prompt_id="p0",
        task="test",
        policy_version=0,
        prompt_token_ids=[1, 2, 3],
        completions=[
            CompletionRecord(
                token_ids=[4, 5], rollout_logprobs=[-0.5, -1.0], reward=reward, finish_reason="stop"
            )
            for reward in (1.0, 0.0)
        ],
    )


async def score_pending(
    redis_url: str,
    teacher: object,
    should_stop: Callable[[], bool],
    groups: int = 1,
) -> None:
    """Publish `groups` groups and have one scorer take and score them as one batch."""
    async with connect_async(redis_url) as client:
        queue = await AsyncQueue.open(client, "test")
        for _ in range(groups):
            await queue.publish(ROLLOUTS, rollout_group(), counter="produced")
        scorer = Scorer(ScorerConfig(mode="teacher"), queue, teacher, "scorer-a")
        deliveries = await queue.consume(ROLLOUTS, "scorer-a", count=groups)
        await scorer.process_until_done(deliveries, should_stop)


def score_pending_group(
    redis_url: str, teacher: FlakyTeacher, should_stop: Callable[[], bool]
) -> None:
    asyncio.run(score_pending(redis_url, teacher, should_stop))


def test_scorer_retries_while_no_teacher_answers(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)
    teacher = FlakyTeacher(unavailable=2)
    score_pending_group(redis_url, teacher, should_stop=lambda: False)
    assert teacher.calls == 3
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1, "scored": 1}
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []


def test_a_stopped_scorer_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)
    teacher = FlakyTeacher(unavailable=1_000)
    score_pending_group(redis_url, teacher, should_stop=lambda: teacher.calls >= 2)
    assert teacher.calls == 2
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1  # another scorer reclaims it


class RedisGoneTeacher(FlakyTeacher):
    """Redis goes away while the group is being scored (e.g. `docker compose restart redis`)."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        raise redis.exceptions.ConnectionError("Connection closed by server.")


def test_a_redis_error_while_scoring_leaves_the_group_pending(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        score_pending_group(redis_url, RedisGoneTeacher(unavailable=0), should_stop=lambda: False)
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}  # not dead-lettered as a refusal of the teacher
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1  # redelivered once reclaimed


def stop_after(seconds: float) -> Callable[[], bool]:
    began = time.monotonic()
    return lambda: time.monotonic() > began + seconds


def test_a_garbled_teacher_answer_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.01)

    async def run() -> None:
        async with (
            ScriptedServer([], GENERATED) as server,  # 200, but no ScoreResponse
            TeacherClient([server.url], backoff_s=0.01, health_interval_s=0) as client,
        ):
            await score_pending(redis_url, client, stop_after(0.5), groups=4)
        assert len(server.requests) > 1  # retried

    asyncio.run(run())
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 4}  # nothing dead-lettered
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 4


def test_a_failure_to_record_the_latency_costs_no_group(
    fresh_redis: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fresh_redis.set(
        RunKeys("test").teacher_latency, "not a list"
    )  # every write to it fails (WRONGTYPE)
    with caplog.at_level(logging.WARNING, logger=scorer_module.__name__):
        asyncio.run(score_pending(redis_url, FlakyTeacher(0), lambda: False, groups=2))
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 2, "scored": 2}
    assert "teacher latency not recorded" in caplog.text and "WRONGTYPE" in caplog.text


class HangingTeacher(FlakyTeacher):
    """Never answers within the test: a teacher call that runs until its deadline."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        self.calls += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def test_a_stop_interrupts_a_teacher_call_and_leaves_the_groups_pending(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    teacher = HangingTeacher(unavailable=0)
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(score_pending(redis_url, teacher, stop_after(0.3)), 10))
    assert time.monotonic() - began < 3.0
    assert teacher.calls == 1
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 1}
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 1


class BuggyTeacher(FlakyTeacher):
    """Scores any batch without token 66, and fails like a bug on one with it."""

    async def score(self, sequences: list[ScoreSequence], top_k: int = 0) -> ScoreResponse:
        if any(66 in s.token_ids for s in sequences):
            raise KeyError("a bug")
        return await super().score(sequences)


def test_an_unexpected_error_leaves_the_batch_pending_and_then_fails_alone(
    fresh_redis: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = GroupQueue(fresh_redis, "test")
    config = QueueConfig(claim_idle_ms=100, max_deliveries=2)
    bad = rollout_group()
    bad.group_id, bad.prompt_token_ids = "bad", [66, 2, 3]

    def done() -> bool:
        stats = queue.stats()
        return stats.get("scored", 0) + stats.get("dead", 0) == 3

    async def run() -> None:
        async with connect_async(redis_url) as client:
            aqueue = await AsyncQueue.open(client, "test", config)
            for group in (rollout_group(), bad, rollout_group()):
                await aqueue.publish(ROLLOUTS, group, counter="produced")
            scorer = Scorer(ScorerConfig(batch_groups=3), aqueue, BuggyTeacher(0), "scorer-a")
            deadline = time.monotonic() + 20
            await scorer.run(lambda: done() or time.monotonic() > deadline)

    with caplog.at_level(logging.ERROR, logger=scorer_module.__name__):
        asyncio.run(run())
    # The first failure parked nothing: the batch was delivered again, one group at a
    # time, and only the group that kept failing was parked, by the delivery bound.
    assert queue.stats() == {"produced": 3, "scored": 2, "dead": 1}
    (letter,) = fresh_redis.xrange(RunKeys("test").stream(DEAD))
    assert decode(letter[1][b"data"], RolloutGroup).group_id == "bad"
    assert letter[1][b"reason"] == b"delivered 3 times without being acknowledged"
    assert "scoring 3 groups failed unexpectedly; they stay pending" in caplog.text


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
