"""Rollout worker: prompts from the task → G samples each from the rollout server →
rewards → one `RolloutGroup` per prompt on the `rollouts` stream, tagged with the
`policy_version` that produced it. Waits while the queue backlog is full (backpressure).

Run: `rlad rollout-worker --config configs/tiny-cpu.yaml --rollout-url http://127.0.0.1:8001`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from services.common.protocol import (
    CompletionRecord,
    GenerateRequest,
    GenerateResponse,
    RolloutGroup,
    SamplingParams,
)
from services.config.workers import RolloutWorkerConfig
from services.queue.keys import ROLLOUTS
from services.queue.queues import AsyncQueue
from services.tasks import Problem, Task

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(
        self,
        config: RolloutWorkerConfig,
        queue: AsyncQueue,
        generate: Callable[[GenerateRequest], Any],
        task: Task,
        tokenizer: Any,
        sync_batch: int | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.generate = generate  # RolloutClient.generate or an in-process engine's
        self.task = task
        self.tokenizer = tokenizer
        self.problems: Iterator[Problem] = task.problems("train", seed=config.seed)
        self.requests = itertools.count()
        self.sync_batch = sync_batch  # synchronous mode: groups per trainer step
        self.served_version = 0  # the policy version of the latest generate response

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            n=self.config.group_size,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            max_tokens=self.config.max_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.config.seed * 1_000_003 + next(self.requests),
        )

    async def produce_once(self) -> int:
        """One generate call for `prompts_per_request` prompts; returns groups published."""
        problems = list(itertools.islice(self.problems, self.config.prompts_per_request))
        prompts = [self.tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
        response: GenerateResponse = await self.generate(
            GenerateRequest(prompts=prompts, sampling=self.sampling())
        )
        now = time.time()
        self.served_version = response.policy_version
        for problem, result in zip(problems, response.results, strict=True):
            group = self.group(problem, result.prompt_token_ids, result.completions, response)
            group.timestamps["generated"] = now
            await self.queue.publish(ROLLOUTS, group, counter="produced")
        return len(problems)

    def group(
        self, problem: Problem, prompt_ids: list[int], completions: list[Any], response: Any
    ) -> RolloutGroup:
        records = []
        for completion in completions:
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            reward = self.task.reward(problem, text)
            records.append(
                CompletionRecord(
                    token_ids=completion.token_ids,
                    rollout_logprobs=completion.logprobs,
                    reward=reward.score,
                    correct=reward.correct,
                    finish_reason=completion.finish_reason,
                )
            )
        return RolloutGroup(
            group_id=uuid.uuid4().hex,
            prompt_id=problem.prompt_id,
            task=self.task.name,
            policy_version=response.policy_version,
            prompt_token_ids=prompt_ids,
            completions=records,
        )

    async def wait_for_new_version(self, seen: int, should_stop: Callable[[], bool]) -> None:
        while await self.queue.trainer_version() <= seen and not should_stop():
            await asyncio.sleep(0.05)

    async def run(self, should_stop: Callable[[], bool], max_groups: int | None = None) -> int:
        produced = in_batch = 0
        while not should_stop() and (max_groups is None or produced < max_groups):
            if self.sync_batch is not None and in_batch >= self.sync_batch:
                # The next batch must come from the weights trained on this one: wait for a
                # version newer than the one that generated it (the trainer's version when
                # the batch started may already be that one, at start-up).
                await self.wait_for_new_version(self.served_version, should_stop)
                in_batch = 0
            await self.queue.wait_for_room(0.2, should_stop)
            if should_stop():
                break
            made = await self.produce_once()
            produced += made
            in_batch += made
        log.info("rollout worker stopping after %d groups", produced)
        return produced
