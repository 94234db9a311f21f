"""Teacher pools on real servers: two real HF teacher servers with different weights, a
real Redis, the real scorer and the real trainer.

- Two pools with routing rules: the scorer (`rlad scorer`) sends the groups of each task
  to their pool only (each server's request counters grow only for its groups), each
  group records its pool and the pool's revision, `rlad monitor` counts the groups each
  pool scored, and a group of a task no pool takes is dead-lettered alone.
- One pool whose replicas serve different weights, and a resume: the trainer pins the
  pool to the revision of its first scored group, dead-letters (with the reason, counted)
  the groups another revision scored, and keeps that pin across `--resume`, so that the
  first groups it reads after the resume cannot move it.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from rich.console import Console

from services.bootstrap.tiny_models import save_tiny_model
from services.clients.teacher import TeacherClient
from services.common.protocol import RolloutGroup, ScoreSequence, ServerInfo
from services.common.wire import decode
from services.config.servers import TeacherServerConfig
from services.config.workers import ScorerConfig
from services.launch.processes import ManagedProcess
from services.monitor.snapshot import read_snapshot
from services.monitor.view import render
from services.queue.connection import connect_async
from services.queue.keys import ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue, QueueReader
from services.workers.scorer import Scorer
from teacher_server.hf_backend import HFTeacherEngine
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import RUN, trained_log, trainer_process, write_config
from tests.teacher_support import Reference, ThreadedServer, assert_logprobs_close

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "services.cli.main"]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny teacher: the same tokenizer, other weights, so another revision."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher-b", "teacher", seed=2)


@contextmanager
def serving(model: Path) -> Iterator[str]:
    """A real HF teacher server of `model` on loopback; its URL."""
    config = TeacherServerConfig(model=str(model), backend="hf", dtype="float32")
    with ThreadedServer(config, HFTeacherEngine(config)) as server:
        yield server.url


@pytest.fixture(scope="module")
def two_teachers(tiny_teacher: Path, other_teacher: Path) -> Iterator[tuple[str, str]]:
    with serving(tiny_teacher) as first, serving(other_teacher) as second:
        yield first, second


def info(url: str) -> ServerInfo:
    return ServerInfo.model_validate(httpx.get(f"{url}/v1/info", timeout=10).json())


def sequences_scored(url: str) -> float:
    """The server's own count of the sequences it scored (its /metrics)."""
    page = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^rlad_teacher_sequences_total ([0-9.e+]+)$", page, re.MULTILINE)
    assert match, page
    return float(match.group(1))


def unscored(index: int, task: str, subset: str | None, rng: random.Random) -> RolloutGroup:
    """A group of four completions (rewards 0/1, so the scorer calls the teacher), as the
    rollout worker publishes it: no teacher logprobs yet."""
    group = scored_group(index, rng)
    for completion in group.completions:
        completion.teacher_logprobs = None
    return group.model_copy(update={"group_id": f"{task}-{index}", "task": task, "subset": subset})


def scored_stream(client: redis.Redis, run: str) -> list[RolloutGroup]:
    return [
        decode(fields[b"data"], RolloutGroup)
        for _, fields in client.xrange(RunKeys(run).stream(SCORED))
    ]


def test_each_pool_scores_the_groups_routed_to_it(
    tmp_path: Path,
    two_teachers: tuple[str, str],
    tiny_student: Path,
    tiny_teacher: Path,
    other_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    math_url, logic_url = two_teachers
    config = tmp_path / "run.yaml"
    pools = [
        {"name": "math", "urls": [math_url], "tasks": ["math"]},
        {"name": "logic", "urls": [logic_url], "tasks": ["kk"]},
    ]
    spec = {
        "name": "pools",
        "run_dir": str(tmp_path),
        "student": str(tiny_student),
        "task": {"name": "kk", "people": [3]},
        "teacher_urls": pools,
        "scorer": {"batch_groups": 7},
    }
    config.write_text(yaml.safe_dump(spec))
    rng = random.Random(0)
    groups = [unscored(i, "kk", "PPL3", rng) for i in range(3)]
    groups += [unscored(i, "math", "algebra", rng) for i in range(3)]
    groups.append(unscored(0, "gsm8k", None, rng))  # a task no pool takes
    queue = GroupQueue(fresh_redis, "pools")
    for group in groups:
        queue.publish(ROLLOUTS, group, counter="produced")
    before = {url: sequences_scored(url) for url in two_teachers}

    argv = [*CLI, "scorer", "--config", str(config), "--redis-url", redis_url]
    scorer = ManagedProcess("scorer", argv, tmp_path / "scorer.log").start()
    try:
        deadline = time.monotonic() + 120
        while queue.stats().get("scored", 0) + queue.stats().get("dead", 0) < len(groups):
            scorer.check_alive()
            assert time.monotonic() < deadline, scorer.tail()
            time.sleep(0.2)
    finally:
        scorer.stop()

    scored = {g.group_id: g for g in scored_stream(fresh_redis, "pools")}
    assert sorted(scored) == sorted(g.group_id for g in groups[:6])
    revisions = {"math": info(math_url).revision, "logic": info(logic_url).revision}
    assert revisions["math"] != revisions["logic"]  # other weights, another revision
    references = {"math": Reference(tiny_teacher), "logic": Reference(other_teacher)}
    for group in scored.values():
        pool = "math" if group.task == "math" else "logic"
        assert (group.teacher_pool, group.teacher_revision) == (pool, revisions[pool])
        completion = group.completions[0]
        sequence = ScoreSequence(
            token_ids=group.prompt_token_ids + completion.token_ids,
            start=len(group.prompt_token_ids),
        )
        expected = references[pool].logprobs(sequence)  # the pool's own model computed them
        assert completion.teacher_logprobs is not None
        assert_logprobs_close(completion.teacher_logprobs, expected)
    # Each server scored the four completions of each of its three groups, and nothing else.
    after = {url: sequences_scored(url) for url in two_teachers}
    assert after[math_url] - before[math_url] == 12
    assert after[logic_url] - before[logic_url] == 12

    assert queue.stats() == {
        "produced": 7,
        "scored": 6,
        "dead": 1,
        "scored_by_pool:math": 3,
        "scored_by_pool:logic": 3,
    }
    snapshot = read_snapshot(QueueReader(fresh_redis, "pools"))
    assert snapshot.teacher_pools == {"logic": 3, "math": 3}
    (letter,) = snapshot.recent_dead
    assert letter.reason.startswith("no teacher pool takes task 'gsm8k'")
    console = Console(width=120, record=True)
    console.print(render(snapshot))
    shown = console.export_text()
    assert "scored by pool math" in shown and "scored by pool logic" in shown


def score_with(redis_url: str, url: str, groups: list[RolloutGroup]) -> None:
    """Publish `groups` and have the real scorer score them on one teacher replica, the
    pool `default` of a run with a plain list of teacher URLs."""

    async def run() -> None:
        async with connect_async(redis_url) as client:
            queue = await AsyncQueue.open(client, RUN)
            for group in groups:
                await queue.publish(ROLLOUTS, group, counter="produced")
            deliveries = await queue.consume(ROLLOUTS, "scorer", count=len(groups))
            async with TeacherClient([url], health_interval_s=0) as teacher:
                scorer = Scorer(ScorerConfig(batch_groups=len(groups)), queue, teacher, "scorer")
                await scorer.process_until_done(deliveries, lambda: False)

    asyncio.run(run())


def test_the_trainer_keeps_each_pool_on_one_revision_across_a_resume(
    tmp_path: Path,
    two_teachers: tuple[str, str],
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    first_url, second_url = two_teachers  # two replicas of one pool, serving other weights
    first, second = info(first_url).revision, info(second_url).revision
    rng = random.Random(1)
    queue = GroupQueue(fresh_redis, RUN)
    # Run 1: the pool's first group comes from the first replica and pins the run to it;
    # the second replica's group is refused, the first replica's four are trained.
    score_with(redis_url, first_url, [unscored(i, "kk", "PPL2", rng) for i in range(2)])
    score_with(redis_url, second_url, [unscored(90, "kk", "PPL2", rng)])
    score_with(redis_url, first_url, [unscored(i, "kk", "PPL2", rng) for i in range(2, 4)])
    config = write_config(tmp_path, tiny_student, steps=2, checkpoint_every=2)
    trainer = trainer_process(config, redis_url, tmp_path)
    assert trainer.wait(timeout_s=300) == 0, trainer.tail()

    # Run 2, resumed: the first group it reads comes from the second replica. Pinned by
    # the checkpoint, the run still refuses it, and trains the first replica's groups.
    score_with(redis_url, second_url, [unscored(91, "kk", "PPL2", rng)])
    score_with(redis_url, first_url, [unscored(i, "kk", "PPL2", rng) for i in range(4, 6)])
    config = write_config(tmp_path, tiny_student, steps=3, checkpoint_every=1)
    resumed = trainer_process(config, redis_url, tmp_path, "--resume")
    assert resumed.wait(timeout_s=300) == 0, resumed.tail()

    trained = sorted(g for row in trained_log(tmp_path) for g in row["groups"])  # type: ignore[attr-defined]
    assert trained == [f"kk-{i}" for i in range(6)]
    stats = queue.stats()
    assert (stats["trained"], stats["dead"], stats["scored"]) == (6, 2, 8)
    letters = QueueReader(fresh_redis, RUN).recent_dead(5)
    assert len(letters) == 2
    for letter in letters:
        assert letter.reason.startswith(
            f"scored by teacher revision {second} of pool default, but this run pins pool "
            f"default to {first}"
        ), letter.reason
