"""What the scorer sends the teacher, and what it does without one, against a real teacher
server (hf backend, in this process) and a real Redis: a group whose rewards are all equal
goes on without a teacher call (but not for kdrl); with `on_teacher_down: grpo` groups go
on degraded once no teacher has answered for `degrade_after_s`, and scoring resumes when one
answers again; with `wait` they stay pending; the teacher says the dtype it computes in,
and the scorer warns when that is coarser than the trainer's."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.cli.scorer import check_teacher
from services.clients.teacher import TeacherClient
from services.common.protocol import CompletionRecord, RolloutGroup, ServerInfo
from services.common.runtime import free_port
from services.config.run import RunConfig, load_run_config
from services.config.servers import TeacherServerConfig
from services.config.workers import QueueConfig, ScorerConfig
from services.queue.connection import connect_async
from services.queue.keys import ROLLOUTS
from services.queue.queues import AsyncQueue, GroupQueue
from services.workers.scorer import Scorer
from teacher_server.hf_backend import HFTeacherEngine
from tests.integration.test_scorer import run_yaml, scored_groups
from tests.teacher_support import ThreadedServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_teacher: Path) -> HFTeacherEngine:
    return HFTeacherEngine(TeacherServerConfig(model=str(tiny_teacher), backend="hf"))


@pytest.fixture(scope="module")
def teacher(engine: HFTeacherEngine) -> Iterator[str]:
    with ThreadedServer(engine.config, engine) as server:
        yield server.url


def group(i: int, rewards: list[float]) -> RolloutGroup:
    return RolloutGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        task="kk",
        policy_version=0,
        prompt_token_ids=[10 + i, 11, 12],
        completions=[
            CompletionRecord(
                token_ids=[20 + i, 21 + j],
                rollout_logprobs=[-1.0, -1.0],
                reward=reward,
                finish_reason="stop",
            )
            for j, reward in enumerate(rewards)
        ],
    )


def sequences_scored(url: str) -> float:
    """The teacher's own count of the sequences it was asked to score."""
    page = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(page):
        if family.name == "rlad_teacher_sequences":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("the teacher exports no rlad_teacher_sequences")


def run_scorer(
    redis_url: str,
    config: ScorerConfig,
    teacher_url: str,
    done: Callable[[GroupQueue], bool],
    timeout_s: float = 30.0,
    queue_config: QueueConfig | None = None,
    consumer: str = "scorer-a",
) -> None:
    """One scorer on the run `test` until `done(queue)` holds (checked from another
    thread, as an operator would) or `timeout_s` passes."""
    watcher = GroupQueue(redis.Redis.from_url(redis_url), "test")
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not done(watcher) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    async def main() -> None:
        async with connect_async(redis_url) as client:
            queue = await AsyncQueue.open(client, "test", queue_config or QueueConfig())
            async with TeacherClient([teacher_url], deadline_s=60, health_interval_s=0.5) as tc:
                await Scorer(config, queue, tc, consumer).run(stop.is_set)

    thread = threading.Thread(target=watch)
    thread.start()
    asyncio.run(main())
    thread.join()


def run_config(
    tmp_path: Path, tiny_student: Path, tiny_teacher: Path, **blocks: object
) -> RunConfig:
    return load_run_config(run_yaml(tmp_path, tiny_student, tiny_teacher, **blocks))


@pytest.mark.parametrize("algorithm", ["trrd", "kdrl"])
def test_a_group_of_equal_rewards_is_scored_only_for_kdrl(
    algorithm: str,
    tmp_path: Path,
    teacher: str,
    tiny_student: Path,
    tiny_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    run = run_config(tmp_path, tiny_student, tiny_teacher, algorithm={"name": algorithm})
    assert run.scorer.skip_zero_variance == (algorithm == "trrd")  # kdrl: always off
    queue = GroupQueue(fresh_redis, "test")
    queue.publish(ROLLOUTS, group(0, [1.0, 1.0, 1.0]), counter="produced")  # all equal
    queue.publish(ROLLOUTS, group(1, [1.0, 0.0, 1.0]), counter="produced")
    before = sequences_scored(teacher)
    run_scorer(redis_url, run.scorer, teacher, lambda q: q.stats().get("scored", 0) == 2)

    skipped = algorithm == "trrd"
    assert sequences_scored(teacher) - before == (3 if skipped else 6)
    expected = {"produced": 2, "scored": 2, "scored_by_pool:default": 1 if skipped else 2}
    expected |= {"skipped_zero_variance": 1} if skipped else {}
    assert queue.stats() == expected
    forwarded = scored_groups(fresh_redis)
    assert all(c.teacher_logprobs for c in forwarded["g1"].completions)
    equal = forwarded["g0"]
    assert not equal.degraded
    assert [c.teacher_logprobs is None for c in equal.completions] == [skipped] * 3


def test_with_on_teacher_down_grpo_groups_go_on_degraded_until_a_teacher_answers(
    engine: HFTeacherEngine, redis_url: str, fresh_redis: redis.Redis
) -> None:
    port = free_port()  # nothing listens there, yet
    config = ScorerConfig(on_teacher_down="grpo", degrade_after_s=1.0, batch_groups=2)
    queue = GroupQueue(fresh_redis, "test")
    for i in range(2):
        queue.publish(ROLLOUTS, group(i, [1.0, 0.0]), counter="produced")
    began = time.monotonic()
    timeline: dict[str, float] = {}
    server = ThreadedServer(engine.config, engine, port=port)

    def phases(q: GroupQueue) -> bool:
        scored = q.stats().get("scored", 0)
        if scored == 2 and "degraded" not in timeline:
            timeline["degraded"] = time.monotonic() - began
            server.__enter__()  # the teacher comes (back) up
            timeline["up"] = time.monotonic()
        # The client's health checks (every 0.5 s here) are what find it again.
        if "up" in timeline and "more" not in timeline and time.monotonic() > timeline["up"] + 1:
            timeline["more"] = time.monotonic()
            q.publish(ROLLOUTS, group(2, [1.0, 0.0]), counter="produced")
        return scored == 3

    try:
        run_scorer(redis_url, config, f"http://127.0.0.1:{port}", phases)
    finally:
        server.stop()
    assert 1.0 <= timeline["degraded"] < 10.0
    assert queue.stats() == {
        "produced": 3,
        "scored": 3,
        "degraded_groups": 2,
        "scored_by_pool:default": 1,  # g2, by the teacher
    }
    forwarded = scored_groups(fresh_redis)
    for name in ("g0", "g1"):
        assert forwarded[name].degraded
        assert all(c.teacher_logprobs is None for c in forwarded[name].completions)
    resumed = forwarded["g2"]
    assert not resumed.degraded and resumed.teacher_revision == engine.info().revision
    assert all(c.teacher_logprobs for c in resumed.completions)


def test_with_on_teacher_down_wait_groups_stay_pending(
    redis_url: str, fresh_redis: redis.Redis
) -> None:
    config = ScorerConfig(on_teacher_down="wait", degrade_after_s=1.0)
    queue = GroupQueue(fresh_redis, "test")
    message_id = queue.publish(ROLLOUTS, group(0, [1.0, 0.0]), counter="produced")
    down = f"http://127.0.0.1:{free_port()}"
    run_scorer(redis_url, config, down, lambda q: False, timeout_s=3.0)
    assert queue.stats() == {"produced": 1}
    assert queue.pending_for(ROLLOUTS, "scorer-a") == [message_id]


@pytest.mark.parametrize(
    ("served", "trained", "warned"),
    [("bfloat16", "fp32", True), ("float32", "fp32", False), ("bfloat16", "bf16", False)],
)
def test_the_teacher_reports_its_dtype_and_the_scorer_warns_when_it_is_coarser(
    served: str,
    trained: str,
    warned: bool,
    tmp_path: Path,
    tiny_student: Path,
    tiny_teacher: Path,
    teacher: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = TeacherServerConfig(model=str(tiny_teacher), backend="hf", dtype=served)
    with ThreadedServer(config, HFTeacherEngine(config)) as server:
        info = ServerInfo.model_validate(httpx.get(f"{server.url}/v1/info", timeout=10).json())
    assert info.dtype == served
    student = ServerInfo.model_validate(httpx.get(f"{teacher}/v1/info", timeout=10).json())
    run = run_config(tmp_path, tiny_student, tiny_teacher, trainer={"dtype": trained})
    with caplog.at_level(logging.WARNING, logger="services.cli.scorer"):
        check_teacher(student, info, run, "default")
    warnings = [r.getMessage() for r in caplog.records if r.name == "services.cli.scorer"]
    if not warned:
        assert warnings == []
        return
    (warning,) = warnings
    assert f"computes in bfloat16, coarser than the trainer's {trained}" in warning
    assert "--dtype float32" in warning


def test_the_dtype_check_needs_no_deepspeed(
    tmp_path: Path,
    tiny_student: Path,
    tiny_teacher: Path,
    teacher: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The scorer's image has no DeepSpeed: `trainer.dtype: auto` is resolved without it."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any import of it fails
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # auto: fp32, as a CPU trainer trains
    info = ServerInfo.model_validate(httpx.get(f"{teacher}/v1/info", timeout=10).json())
    coarse = info.model_copy(update={"dtype": "bfloat16"})
    run = run_config(tmp_path, tiny_student, tiny_teacher, trainer={"dtype": "auto"})
    with caplog.at_level(logging.WARNING, logger="services.cli.scorer"):
        check_teacher(info, coarse, run, "default")
    assert "coarser than the trainer's fp32 (trainer.dtype auto" in caplog.text
