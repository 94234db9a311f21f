"""`rollout.synchronous`: every batch comes from the weights trained on the batch before it
(staleness 0), including the first batches around the trainer's start-up. A real Redis;
the rollout server is replaced by a function that reports the served version."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis
import yaml

from services.bootstrap.tiny_models import build_tokenizer
from services.common.protocol import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    PromptCompletions,
)
from services.common.runtime import free_port
from services.config.task import KKTaskConfig
from services.config.workers import QueueConfig, RolloutWorkerConfig
from services.launch.processes import ManagedProcess
from services.launch.up import RLAD
from services.queue.connection import connect_async
from services.queue.keys import ROLLOUTS, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.tasks import load_task
from services.workers.rollout_worker import RolloutWorker
from tests.integration.trainer_runs import push_student
from tests.process_support import wait_for

BATCH = 2  # groups per trainer step
STEPS = 3


def test_each_synchronous_batch_is_generated_by_the_latest_weights(
    fresh_redis: redis.Redis, redis_url: str
) -> None:
    served = {"version": 1}  # the trainer's start-up push has made the server serve v1

    async def generate(request: GenerateRequest) -> GenerateResponse:
        assert request.prompts is not None
        completion = Completion(token_ids=[5, 6], logprobs=[-0.5, -0.5], finish_reason="stop")
        results = [
            PromptCompletions(prompt_token_ids=p, completions=[completion] * request.sampling.n)
            for p in request.prompts
        ]
        return GenerateResponse(policy_version=served["version"], results=results)

    queue = GroupQueue(fresh_redis, "test", QueueConfig(max_backlog=100))
    config = RolloutWorkerConfig(group_size=2, prompts_per_request=BATCH, synchronous=True)
    task = load_task(KKTaskConfig(people=[2], rendering="compact"))

    async def trainer() -> list[tuple[int, list[int]]]:
        await asyncio.sleep(0.2)  # the worker starts first and produces its first batch
        fresh_redis.hset(RunKeys("test").trainer_state, "policy_version", served["version"])
        steps = []
        for _ in range(STEPS):
            deadline = asyncio.get_running_loop().time() + 10
            while fresh_redis.xlen(RunKeys("test").stream(ROLLOUTS)) < BATCH:
                assert asyncio.get_running_loop().time() < deadline, "no batch arrived"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a worker running ahead would publish more meanwhile
            batch = queue.consume(ROLLOUTS, "trainer", count=100, block_ms=10, reclaim=False)
            queue.ack(ROLLOUTS, [d.message_id for d in batch])
            fresh_redis.xtrim(ROLLOUTS, maxlen=0)
            versions = [d.group.policy_version for d in batch if d.group is not None]
            steps.append((served["version"], versions))
            served["version"] += 1  # train, push the new weights, publish the new version
            fresh_redis.hset(RunKeys("test").trainer_state, "policy_version", served["version"])
        return steps

    async def both() -> list[tuple[int, list[int]]]:
        async with connect_async(redis_url) as client:
            worker_queue = await AsyncQueue.open(client, "test", QueueConfig(max_backlog=100))
            worker = RolloutWorker(
                config, worker_queue, generate, task, build_tokenizer(), sync_batch=BATCH
            )
            stop = asyncio.Event()
            producing = asyncio.create_task(worker.run(stop.is_set))
            steps = await trainer()
            stop.set()
            await producing
        return steps

    steps = asyncio.run(both())
    for trainer_version, versions in steps:
        assert versions == [trainer_version] * BATCH, steps


def test_the_worker_process_waits_for_new_weights_after_a_batch(
    fresh_redis: redis.Redis, redis_url: str, tiny_student: Path, tmp_path: Path
) -> None:
    """`rlad rollout-worker` with `rollout.synchronous` against a real rollout server:
    one batch of `trainer.batch_prompts` groups, then nothing until a new version."""
    port = free_port()
    serve = ["serve-rollout", "--model", str(tiny_student), "--backend", "hf"]
    serve += ["--host", "127.0.0.1", "--port", str(port)]
    server = ManagedProcess("rollout", [*RLAD, *serve], tmp_path / "rollout.log").start()
    config = {
        "name": "sync",
        "run_dir": str(tmp_path / "runs"),
        "student": str(tiny_student),
        "task": {"name": "kk", "people": [2], "rendering": "compact"},
        "algorithm": {"name": "grpo"},
        "scorer": {"mode": "passthrough"},
        "trainer": {"batch_prompts": BATCH},
        "rollout": {
            "group_size": 2,
            "prompts_per_request": 1,
            "max_tokens": 8,
            "synchronous": True,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    argv = [*RLAD, "rollout-worker", "--config", str(path), "--redis-url", redis_url]
    try:
        server.wait_healthy(f"{url}/health", timeout_s=120)
        worker = ManagedProcess("worker", [*argv, "--rollout-url", url], tmp_path / "w.log")
        worker.start()
        try:
            wait_for(
                lambda: fresh_redis.xlen(RunKeys("sync").stream(ROLLOUTS)) >= BATCH, 60, worker
            )
            time.sleep(3)  # an asynchronous worker would run on to the backlog bound
            assert fresh_redis.xlen(RunKeys("sync").stream(ROLLOUTS)) == BATCH
            push_student(url, tiny_student, 1)  # as the trainer does after a step,
            fresh_redis.hset(RunKeys("sync").trainer_state, "policy_version", 1)  # then says so
            wait_for(
                lambda: fresh_redis.xlen(RunKeys("sync").stream(ROLLOUTS)) >= 2 * BATCH, 60, worker
            )
        finally:
            worker.stop()
    finally:
        server.stop()
