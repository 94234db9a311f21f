"""A rollout server that restarts serves its base weights as version 0: the trainer, waiting
for groups, pushes its weights there again within seconds, and the rollout worker publishes
nothing that such a server generated meanwhile. A real Redis; the worker alone against a
stand-in server, then the trainer, a real server restarted on its port and the worker as
processes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import pytest
import redis

from services.bootstrap.tiny_models import build_tokenizer
from services.common.protocol import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    PromptCompletions,
    RolloutGroup,
)
from services.common.runtime import free_port
from services.common.wire import decode
from services.config.task import KKTaskConfig
from services.config.workers import QueueConfig, RolloutWorkerConfig
from services.launch.processes import ManagedProcess
from services.launch.up import RLAD
from services.queue.connection import connect_async
from services.queue.keys import ROLLOUTS, SCORED, RunKeys
from services.queue.queues import AsyncQueue, GroupQueue
from services.tasks import load_task
from services.workers.rollout_worker import RolloutWorker
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import (
    RUN,
    rollout_server,
    served_version,
    trainer_process,
    write_config,
)
from tests.process_support import wait_for

CATCH_UP_S = 10  # the trainer asks every 2 s; a push of the tiny student takes about 1 s


def published(client: redis.Redis) -> list[RolloutGroup]:
    return [
        decode(fields[b"data"], RolloutGroup)
        for _, fields in client.xrange(RunKeys(RUN).stream(ROLLOUTS))
    ]


def test_the_worker_publishes_nothing_from_a_server_behind_the_trainer(
    fresh_redis: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    served = {"version": 0}  # restarted: the trainer had pushed 3

    async def generate(request: GenerateRequest) -> GenerateResponse:
        assert request.prompts is not None
        completion = Completion(token_ids=[5, 6], logprobs=[-0.5, -0.5], finish_reason="stop")
        results = [
            PromptCompletions(prompt_token_ids=p, completions=[completion] * request.sampling.n)
            for p in request.prompts
        ]
        return GenerateResponse(policy_version=served["version"], results=results)

    fresh_redis.hset(RunKeys(RUN).trainer_state, "policy_version", 3)
    config = RolloutWorkerConfig(group_size=2, prompts_per_request=1)
    task = load_task(KKTaskConfig(people=[2], rendering="compact"))
    first_prompt = next(task.problems("train", seed=config.seed)).prompt_id

    async def scenario() -> int:
        async with connect_async(redis_url) as client:
            queue = await AsyncQueue.open(client, RUN, QueueConfig(max_backlog=100))
            worker = RolloutWorker(config, queue, generate, task, build_tokenizer())
            stop = asyncio.Event()
            producing = asyncio.create_task(worker.run(stop.is_set))
            await asyncio.sleep(2)  # several answers from the server behind
            while_behind = fresh_redis.xlen(RunKeys(RUN).stream(ROLLOUTS))
            served["version"] = 3  # the trainer's push reached the server
            deadline = time.monotonic() + 10
            while fresh_redis.xlen(RunKeys(RUN).stream(ROLLOUTS)) < 2:
                assert time.monotonic() < deadline, "the worker did not go on"
                await asyncio.sleep(0.05)
            stop.set()
            await producing
        return while_behind

    with caplog.at_level(logging.INFO, logger="services.workers.rollout_worker"):
        assert asyncio.run(scenario()) == 0
    groups = published(fresh_redis)
    assert {g.policy_version for g in groups} == {3}
    assert groups[0].prompt_id == first_prompt, "the prompts answered behind are asked again"
    behind = [r for r in caplog.records if "behind the trainer's 3" in r.getMessage()]
    assert len(behind) == 1 and behind[0].levelno == logging.INFO


def test_a_restarted_server_gets_the_trainers_version_again(
    tmp_path: Path,
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(4)
    port = free_port()
    server, url = rollout_server(tiny_student, tmp_path, port)
    config = write_config(tmp_path, tiny_student, steps=2, max_staleness=1000)
    trainer = worker = None
    try:
        for i in range(2):
            queue.publish(SCORED, scored_group(i, rng), counter="scored")
        trainer = trainer_process(config, redis_url, tmp_path, "--rollout-url", url)
        wait_for(lambda: served_version(url) == 1, 240, trainer)  # step 1, pushed

        argv = [*RLAD, "rollout-worker", "--config", str(config), "--redis-url", redis_url]
        worker = ManagedProcess("worker", [*argv, "--rollout-url", url], tmp_path / "worker.log")
        worker.start()
        wait_for(lambda: fresh_redis.xlen(RunKeys(RUN).stream(ROLLOUTS)) >= 1, 120, worker)

        server.kill()
        server, _ = rollout_server(tiny_student, tmp_path, port)  # version 0 again
        wait_for(lambda: served_version(url) == 1, CATCH_UP_S, trainer)
        before = fresh_redis.xlen(RunKeys(RUN).stream(ROLLOUTS))
        wait_for(lambda: fresh_redis.xlen(RunKeys(RUN).stream(ROLLOUTS)) >= before + 2, 120, worker)
        assert {g.policy_version for g in published(fresh_redis)} == {1}

        # The next step's push reaches the restarted server like any other.
        for i in range(2, 4):
            queue.publish(SCORED, scored_group(i, rng), counter="scored")
        assert trainer.wait(timeout_s=240) == 0, trainer.tail()
        assert served_version(url) == 2
    finally:
        for proc in (worker, trainer, server):
            if proc is not None:
                proc.stop()
