"""The scorer against a real teacher server and a real Redis: groups get the teacher's
logprobs, and a scorer killed mid-work has its pending groups reclaimed by another one."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis
import torch
import yaml
from transformers import AutoModelForCausalLM

from services.common.logprobs import sequence_logprobs
from services.common.protocol import CompletionRecord, RolloutGroup
from services.common.runtime import free_port
from services.common.wire import decode
from services.config.workers import QueueConfig
from services.launch.processes import ManagedProcess
from services.queue.keys import ROLLOUTS, SCORED, RunKeys
from services.queue.queues import GroupQueue

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
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "test",
                "student": str(tiny_student),
                "teacher": str(tiny_teacher),
                "task": {"name": "kk"},
                "queue": {"claim_idle_ms": 1000},
                "scorer": {"batch_groups": 4},
            }
        )
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
    assert queue.stats() == {"produced": 4, "scored": 4}

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
