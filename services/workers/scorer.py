"""Scorer: consumes rollout groups, adds the teacher's logprob of every completion token
(through `TeacherClient`, balanced over all teacher replicas) and forwards the scored group
to `rlad:scored`, acknowledging the source in the same transaction.

When every teacher is down the scorer keeps the messages pending and retries with backoff
(the trainer waits; nothing is lost). A message the teacher rejects as invalid is
dead-lettered with the reason. `passthrough` mode forwards groups unscored (plain GRPO).

Run: `rlad scorer --config configs/tiny-cpu.yaml --teacher-url http://127.0.0.1:8002`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from services.clients.teacher import TeacherUnavailable
from services.common.protocol import RolloutGroup, ScoreSequence
from services.config.run import ScorerConfig
from services.queue.streams import ROLLOUTS, SCORED, TEACHER_LATENCY, Delivery, GroupQueue

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 1000


class Scorer:
    def __init__(
        self,
        config: ScorerConfig,
        queue: GroupQueue,
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
        latency_ms = (time.perf_counter() - started) * 1000
        pipe = self.queue.redis.pipeline(transaction=False)
        pipe.lpush(TEACHER_LATENCY, round(latency_ms, 2))
        pipe.ltrim(TEACHER_LATENCY, 0, LATENCY_SAMPLES - 1)
        pipe.execute()
        for completion, scores in zip(targets, response.scores, strict=True):
            completion.teacher_logprobs = scores.logprobs
        for group in groups:
            group.teacher_revision = response.revision

    async def process(self, deliveries: list[Delivery]) -> None:
        groups = [d.group for d in deliveries if d.group is not None]
        if self.config.mode == "teacher":
            try:
                await self.score_groups(groups)
            except TeacherUnavailable:
                raise
            except Exception as exc:  # the teacher refused this input: park it with the reason
                for delivery in deliveries:
                    self.queue.dead_letter(ROLLOUTS, delivery.message_id, f"scoring failed: {exc}")
                return
        now = time.time()
        for delivery, group in zip(deliveries, groups, strict=True):
            group.timestamps["scored"] = now
            self.queue.forward(ROLLOUTS, delivery.message_id, SCORED, group, counter="scored")

    async def process_until_done(
        self, deliveries: list[Delivery], should_stop: Callable[[], bool]
    ) -> None:
        """Retry while no teacher answers; the messages stay pending meanwhile, and if
        another scorer reclaims and forwards them first, our forward is a no-op."""
        backoff = 1.0
        while True:
            try:
                await self.process(deliveries)
                return
            except TeacherUnavailable as exc:
                if should_stop():
                    return
                log.error("no teacher answered; retrying in %.0fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def run(self, should_stop: Callable[[], bool]) -> int:
        done = 0
        while not should_stop():
            deliveries = await asyncio.to_thread(
                self.queue.consume, ROLLOUTS, self.consumer, self.config.batch_groups, 500
            )
            if deliveries:
                await self.process_until_done(deliveries, should_stop)
                done += len(deliveries)
        log.info("scorer %s stopping after %d groups", self.consumer, done)
        return done
