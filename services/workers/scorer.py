"""Scorer: consumes rollout groups, adds the teacher's logprob of every completion token
(through `TeacherClient`, balanced over all teacher replicas) and forwards the scored group
to `rlad:scored`, acknowledging the source in the same transaction.

When every teacher is down the scorer keeps the messages pending and retries with backoff
(services/clients/retry.py; the trainer waits, nothing is lost). A message the teacher
rejects as invalid is dead-lettered with the reason. `passthrough` mode forwards groups
unscored (plain GRPO).

Run: `rlad scorer --config configs/tiny-cpu.yaml --teacher-url http://127.0.0.1:8002`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from services.clients.retry import backoff
from services.clients.teacher import TeacherUnavailable
from services.common.protocol import RolloutGroup, ScoreSequence
from services.config.workers import ScorerConfig
from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import AsyncQueue
from services.queue.streams import Delivery

log = logging.getLogger(__name__)

TEACHER_RETRY_S = 1.0  # the first wait once no teacher answers; it doubles up to the max
TEACHER_RETRY_MAX_S = 30.0


class Scorer:
    def __init__(
        self,
        config: ScorerConfig,
        queue: AsyncQueue,
        teacher: Any | None,  # TeacherClient, or None in passthrough mode
        consumer: str,
    ) -> None:
        if config.mode == "teacher" and teacher is None:
            raise ValueError("scorer mode 'teacher' needs a TeacherClient")
        self.config = config
        self.queue = queue
        self.teacher = teacher
        self.consumer = consumer

    async def score_groups(self, groups: list[RolloutGroup]) -> None:
        """Fill `teacher_logprobs` of every non-empty completion, in one teacher call."""
        sequences, targets = [], []
        for group in groups:
            for completion in group.completions:
                if completion.token_ids:
                    ids = group.prompt_token_ids + completion.token_ids
                    sequences.append(
                        ScoreSequence(token_ids=ids, start=len(group.prompt_token_ids))
                    )
                    targets.append(completion)
                else:
                    completion.teacher_logprobs = []
        if not sequences:
            return
        started = time.perf_counter()
        response = await self.teacher.score(sequences)  # type: ignore[union-attr]
        await self.queue.record_teacher_latency((time.perf_counter() - started) * 1000)
        for completion, scores in zip(targets, response.scores, strict=True):
            completion.teacher_logprobs = scores.logprobs
        for group in groups:
            group.teacher_revision = response.revision

    async def process(self, deliveries: list[Delivery]) -> None:
        groups = [d.group for d in deliveries if d.group is not None]
        if self.config.mode == "teacher":
            try:
                await self.score_groups(groups)
            except (TeacherUnavailable, RedisError):
                raise  # no teacher answered, or Redis went away: the groups stay pending
            except Exception as exc:  # the teacher refused this input: park it with the reason
                reason = f"scoring failed: {exc}"
                for delivery in deliveries:
                    await self.queue.dead_letter(ROLLOUTS, delivery.message_id, reason)
                return
        now = time.time()
        for delivery, group in zip(deliveries, groups, strict=True):
            group.timestamps["scored"] = now
            await self.queue.forward(ROLLOUTS, delivery.message_id, SCORED, group, counter="scored")

    async def process_until_done(
        self, deliveries: list[Delivery], should_stop: Callable[[], bool]
    ) -> None:
        """Retry while no teacher answers, until stopped; the messages stay pending
        meanwhile, and if another scorer reclaims and forwards them first, our forward is a
        no-op."""
        policy = backoff(
            TeacherUnavailable,
            lambda _: should_stop(),
            initial_s=TEACHER_RETRY_S,
            max_s=TEACHER_RETRY_MAX_S,
            log=log,
            level=logging.ERROR,
        )
        try:
            await policy(self.process, deliveries)
        except TeacherUnavailable:  # stopping: the groups stay pending for another scorer
            log.warning("stopped with %d groups unscored", len(deliveries))

    async def run(self, should_stop: Callable[[], bool]) -> int:
        done = 0
        while not should_stop():
            deliveries = await self.queue.consume(
                ROLLOUTS, self.consumer, self.config.batch_groups, 500
            )
            if deliveries:
                await self.process_until_done(deliveries, should_stop)
                done += len(deliveries)
        log.info("scorer %s stopping after %d groups", self.consumer, done)
        return done
