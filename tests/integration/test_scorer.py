"""The scorer against a real teacher server and a real Redis: groups get the teacher's
logprobs, a scorer killed mid-work has its pending groups reclaimed by another one, a
group the teacher refuses is parked alone, a scorer with the wrong API key keeps its
groups pending until the key is right, and SIGTERM stops a scorer whose teacher is down
at once, its group pending."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
import yaml
from transformers import AutoModelForCausalLM

from services.clients.teacher import TeacherClient
from services.common.logprobs import sequence_logprobs
from services.common.protocol import CompletionRecord, RolloutGroup, ScoreSequence
from services.common.runtime import free_port
from services.common.wire import decode
from services.config.servers import TeacherServerConfig
from services.config.workers import QueueConfig, ScorerConfig
from services.launch.processes import ManagedProcess
from services.queue.connection import connect_async
from services.queue.keys import DEAD, ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.workers import scorer as scorer_module
from services.workers.scorer import Scorer
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import Reference, ThreadedServer, assert_logprobs_close

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "services.cli.main"]


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> object:
    """A real HF teacher server that takes 1.5 s per request, like a distant replica."""
    port = free_port()
    log = tmp_path_factory.mktemp("teacher") / "teacher.log"
    argv = [*CLI, "serve-teacher", "--model", str(tiny_teacher), "--backend", "hf"]
    flags = ["--port", str(port), "--inject-latency-ms", "1500"]
    proc = ManagedProcess("teacher", [*argv, *flags], log).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", timeout_s=120)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Iterator[str]:
    """A real HF teacher app on loopback, in this process: it reads RLAD_API_KEY on every
    request, so a test sets the key with monkeypatch."""
    config = TeacherServerConfig(model=str(tiny_teacher), backend="hf", dtype="float32")
    with ThreadedServer(config, HFTeacherEngine(config)) as server:
        yield server.url


def rollout_group(i: int) -> RolloutGroup:
    return RolloutGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        task="kk",
        policy_version=0,
        prompt_token_ids=[10 + i, 11, 12],
        completions=[
            CompletionRecord(
                token_ids=[20, 21 + j],
                rollout_logprobs=[-1.0, -1.0],
                reward=1.0,
                finish_reason="stop",
            )
            for j in range(2)
        ]
        + [
            CompletionRecord(token_ids=[], rollout_logprobs=[], reward=-1.0, finish_reason="length")
        ],
    )


def run_yaml(folder: Path, student: Path, teacher: Path, **sections: object) -> Path:
    config = folder / "run.yaml"
    spec = {
        "name": "test",
        "task": {"name": "kk"},
        "student": str(student),
        "teacher": str(teacher),
    }
    config.write_text(yaml.safe_dump({**spec, **sections}))
    return config


def scorer(config: Path, url: str, redis_url: str, name: str, folder: Path) -> ManagedProcess:
    argv = [*CLI, "scorer", "--config", str(config), "--teacher-url", url]
    return ManagedProcess(
        name, [*argv, "--redis-url", redis_url, "--consumer", name], folder / f"{name}.log"
    ).start()


def test_killed_scorer_groups_are_reclaimed_and_scored_once(
    tmp_path: Path,
    slow_teacher: str,
    tiny_student: Path,
    tiny_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    config = run_yaml(
        tmp_path,
        tiny_student,
        tiny_teacher,
        queue={"claim_idle_ms": 1000},
        scorer={"batch_groups": 4},
    )
    queue = GroupQueue(fresh_redis, "test", QueueConfig(claim_idle_ms=1000))
    for i in range(4):
        queue.publish(ROLLOUTS, rollout_group(i), counter="produced")
    doomed = scorer(config, slow_teacher, redis_url, "scorer-doomed", tmp_path)
    deadline = time.monotonic() + 60
    while len(queue.pending_for(ROLLOUTS, "scorer-doomed")) < 4:
        doomed.check_alive()
        assert time.monotonic() < deadline, doomed.tail()
        time.sleep(0.05)
    doomed.kill()  # mid-request: the teacher takes 1.5 s, nothing was forwarded yet
    assert fresh_redis.xlen(RunKeys("test").stream(SCORED)) == 0

    rescuer = scorer(config, slow_teacher, redis_url, "scorer-rescuer", tmp_path)
    try:
        deadline = time.monotonic() + 90
        while queue.stats().get("scored", 0) < 4:
            rescuer.check_alive()
            assert time.monotonic() < deadline, rescuer.tail()
            time.sleep(0.2)
    finally:
        rescuer.stop()
    assert queue.pending_for(ROLLOUTS, "scorer-doomed") == []
    scored = [
        decode(fields[b"data"], RolloutGroup)
        for _, fields in fresh_redis.xrange(RunKeys("test").stream(SCORED))
    ]
    assert sorted(g.group_id for g in scored) == ["g0", "g1", "g2", "g3"]
    assert queue.stats() == {"produced": 4, "scored": 4, "scored_by_pool:default": 4}

    # The attached logprobs are the teacher's: compare with a local forward pass.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for group in scored:
        assert group.teacher_revision
        for completion in group.completions[:2]:
            ids = torch.tensor([group.prompt_token_ids + completion.token_ids])
            with torch.no_grad():
                expected, _ = sequence_logprobs(model, ids, torch.ones_like(ids))
            got = torch.tensor(completion.teacher_logprobs)
            torch.testing.assert_close(got, expected[0, 2:], atol=1e-4, rtol=0)
        assert group.completions[2].teacher_logprobs == []


def score_batch(
    redis_url: str,
    groups: list[RolloutGroup],
    teacher_url: str,
    api_key: str,
    stop_after_s: float | None = None,
) -> None:
    """Publish `groups` unless already published, have one scorer take them all (reclaiming
    pending ones) and score them as one batch; stop after `stop_after_s` if given."""

    async def run() -> None:
        async with connect_async(redis_url) as client:
            queue = await AsyncQueue.open(client, "test", QueueConfig(claim_idle_ms=100))
            if not await client.xlen(RunKeys("test").stream(ROLLOUTS)):
                for group in groups:
                    await queue.publish(ROLLOUTS, group, counter="produced")
            await asyncio.sleep(0.2)  # idle past claim_idle_ms: pending ones are reclaimed
            deliveries = await queue.consume(ROLLOUTS, "scorer-a", count=len(groups))
            assert len(deliveries) == len(groups)
            began = time.monotonic()
            async with TeacherClient([teacher_url], api_key=api_key, health_interval_s=0) as tc:
                scorer = Scorer(ScorerConfig(batch_groups=len(groups)), queue, tc, "scorer-a")
                await scorer.process_until_done(
                    deliveries,
                    lambda: stop_after_s is not None and time.monotonic() > began + stop_after_s,
                )

    asyncio.run(run())


def scored_groups(client: redis.Redis, stream: str = SCORED) -> dict[str, RolloutGroup]:
    entries = client.xrange(RunKeys("test").stream(stream))
    return {g.group_id: g for g in (decode(f[b"data"], RolloutGroup) for _, f in entries)}


def test_a_group_the_teacher_refuses_is_dead_lettered_alone(
    teacher: str, tiny_teacher: Path, redis_url: str, fresh_redis: redis.Redis
) -> None:
    poisoned = rollout_group(3)
    poisoned.completions[1].token_ids = [20, 1_000_000]  # outside the teacher's vocabulary
    groups = [rollout_group(0), rollout_group(1), poisoned, rollout_group(2)]
    score_batch(redis_url, groups, teacher, api_key="")

    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 4, "scored": 3, "dead": 1, "scored_by_pool:default": 3}
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []
    scored = scored_groups(fresh_redis)
    assert sorted(scored) == ["g0", "g1", "g2"]
    reference = Reference(tiny_teacher)
    for group in scored.values():
        for completion in group.completions[:2]:
            ids = group.prompt_token_ids + completion.token_ids
            seq = ScoreSequence(token_ids=ids, start=len(group.prompt_token_ids))
            assert completion.teacher_logprobs is not None
            assert_logprobs_close(completion.teacher_logprobs, reference.logprobs(seq))
    reasons = {
        decode(fields[b"data"], RolloutGroup).group_id: fields[b"reason"].decode()
        for _, fields in fresh_redis.xrange(RunKeys("test").stream(DEAD))
    }
    assert sorted(reasons) == ["g3"]
    assert f"{teacher} refused POST /v1/score: HTTP 422: sequences[" in reasons["g3"]
    assert "= 1000000 is outside the vocabulary" in reasons["g3"]


def test_a_wrong_api_key_keeps_the_groups_pending_until_it_is_fixed(
    teacher: str,
    redis_url: str,
    fresh_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RLAD_API_KEY", "the-teachers-key")
    monkeypatch.setattr(scorer_module, "TEACHER_RETRY_S", 0.05)
    groups = [rollout_group(i) for i in range(4)]
    with caplog.at_level(logging.ERROR, logger=scorer_module.__name__):
        score_batch(redis_url, groups, teacher, api_key="an-old-key", stop_after_s=1.0)
    queue = GroupQueue(fresh_redis, "test")
    assert queue.stats() == {"produced": 4}  # nothing dead-lettered, nothing scored
    assert len(queue.pending_for(ROLLOUTS, "scorer-a")) == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "a scorer that cannot score must say so at ERROR"
    assert f"{teacher}: HTTP 401" in errors[0]
    assert "RLAD_API_KEY does not match the teacher's" in errors[0]

    score_batch(redis_url, groups, teacher, api_key="the-teachers-key")  # the key fixed
    assert queue.stats() == {"produced": 4, "scored": 4, "scored_by_pool:default": 4}
    assert sorted(scored_groups(fresh_redis)) == ["g0", "g1", "g2", "g3"]
    assert queue.pending_for(ROLLOUTS, "scorer-a") == []


def test_sigterm_stops_a_scorer_whose_teacher_is_down_and_leaves_its_group_pending(
    tmp_path: Path,
    tiny_student: Path,
    tiny_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    # A deadline far past the 10 s the stop may take: only a stop that interrupts the
    # teacher call and the backoff is fast enough.
    config = run_yaml(tmp_path, tiny_student, tiny_teacher, scorer={"deadline_s": 60})
    queue = GroupQueue(fresh_redis, "test")
    message_id = queue.publish(ROLLOUTS, rollout_group(0), counter="produced")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = scorer(config, down, redis_url, "scorer-stopped", tmp_path)
    try:
        deadline = time.monotonic() + 60
        while queue.pending_for(ROLLOUTS, "scorer-stopped") != [message_id]:
            proc.check_alive()
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.05)
        time.sleep(1.0)  # well into the teacher call and its retries
        began = time.monotonic()
        proc.stop(grace_s=10)  # SIGTERM, then SIGKILL after 10 s
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.proc is not None
    assert (proc.proc.returncode, took < 10) == (0, True), proc.tail()
    assert "stopped with 1 groups unscored" in proc.tail()
    assert queue.pending_for(ROLLOUTS, "scorer-stopped") == [message_id]
    assert queue.stats() == {"produced": 1}
