"""Scorer: consumes rollout groups, adds the teacher's logprob of every completion token
(each group through its teacher pool's `TeacherClient`, balanced over that pool's
replicas: services/clients/teacher_pools.py) and forwards the scored group to the
`scored` stream, acknowledging the source in the same transaction. `passthrough` mode
forwards groups unscored (plain GRPO).

A teacher call costs its latency however small the batch, so a scorer keeps up to
`scorer.max_in_flight` batches at the teacher at once, taking more groups while earlier
batches are being scored. Each batch is on its own: forwarded when it finishes, retried,
degraded or stopped as below without touching the others. A scorer never reclaims the
groups it is still working on (`queue.consume(holding=...)`).

No teacher call that cannot matter: with `scorer.skip_zero_variance` (on by default, off for
kdrl) a group whose rewards are all equal has advantages of exactly 0, so TRRD and GRPO take
no gradient from it whatever the teacher says; it is forwarded unscored and counted as
`skipped_zero_variance`.

A failure costs only the groups at fault:

- The teacher refuses a batch as invalid input (`TeacherRequestError`, or its kind
  `NoTeacherPool`: a group of a task that no teacher pool takes): the batch is scored
  again in halves, down to single groups; a group refused on its own is dead-lettered
  with the reason, the others are forwarded.
- No teacher can score (`TeacherUnavailable`: all down, a wrong API key, a URL that serves
  no teacher, a garbled answer): the groups stay pending and the scorer retries with
  backoff (services/clients/retry.py), logging an ERROR that says what to fix; the trainer
  waits, nothing is lost. With `scorer.on_teacher_down: grpo`, once no teacher has answered
  for `scorer.degrade_after_s`, groups are forwarded unscored and marked `degraded` (the
  trainer takes them as plain GRPO; counted as `degraded_groups`) without a call while the
  client's health checks find no teacher; as soon as one answers again, scoring resumes.
- Anything else (a bug): nothing is dead-lettered. The groups stay pending, are delivered
  again after `queue.claim_idle_ms` and then scored one at a time, so that the queue's
  `queue.max_deliveries` bound parks only a group that keeps failing. A Redis error stops
  the scorer, the groups pending.

Every `PRUNE_EVERY_S` a scorer forgets the consumers of gone scorers that hold no message
(they would otherwise pile up with every restart).

SIGTERM/SIGINT stops a scorer within `STOP_POLL_S`, even mid-call or mid-backoff; the
groups of every unfinished batch stay pending for another scorer.

Run: `rlad scorer --config configs/tiny-cpu.yaml --teacher-url http://127.0.0.1:8002`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from services.clients.retry import backoff
from services.clients.teacher import TeacherRequestError, TeacherUnavailable
from services.clients.teacher_pools import TeacherPool, TeacherPools
from services.common.protocol import CompletionRecord, RolloutGroup, ScoreSequence, TeacherTopK
from services.config.workers import ScorerConfig
from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import AsyncQueue
from services.queue.state import scored_by_pool
from services.queue.streams import Delivery

log = logging.getLogger(__name__)
T = TypeVar("T")

TEACHER_RETRY_S = 1.0  # the first wait once no teacher answers; it doubles up to the max
TEACHER_RETRY_MAX_S = 30.0
STOP_POLL_S = 0.2  # how often work in progress checks whether to stop
PRUNE_EVERY_S = 60.0


class Stopped(Exception):
    """Asked to stop before the work finished; whatever it held stays pending."""


async def until_stopped(work: Awaitable[T], should_stop: Callable[[], bool]) -> T:
    """Await `work`, cancelling it and raising `Stopped` once `should_stop()` says so: a
    teacher call may last until its deadline and a backoff wait up to a minute, neither
    of which may hold up a stop."""
    task = asyncio.ensure_future(work)
    try:
        while not should_stop():
            done, _ = await asyncio.wait({task}, timeout=STOP_POLL_S)
            if done:
                return task.result()
        raise Stopped
    finally:
        task.cancel()  # a no-op once it finished
        await asyncio.wait({task})


class Scorer:
    def __init__(
        self,
        config: ScorerConfig,
        queue: AsyncQueue,
        teacher: Any | None,  # TeacherPools or one TeacherClient; None in passthrough mode
        consumer: str,
    ) -> None:
        if config.mode == "teacher" and teacher is None:
            raise ValueError("scorer mode 'teacher' needs a TeacherClient")
        self.config = config
        self.queue = queue
        self.pools = TeacherPools.of(teacher) if teacher is not None else None
        self.consumer = consumer
        self.answered_at = time.monotonic()  # when a teacher last scored (or the start)
        self.degraded = False  # whether groups go on unscored now (on_teacher_down: grpo)

    async def score_groups(self, groups: list[RolloutGroup]) -> None:
        """Fill `teacher_logprobs` (and with `scorer.top_k`, `teacher_top_k`) of every
        non-empty completion: one teacher call per pool the groups are routed to
        (services/clients/teacher_pools.py), concurrently."""
        assert self.pools is not None
        await self.pools.each(groups, self._score_with)
        self.answered_at = time.monotonic()
        if self.degraded:
            self.degraded = False
            log.warning("a teacher answers again: groups are scored again")

    async def _score_with(self, pool: TeacherPool, groups: list[RolloutGroup]) -> None:
        """Score `groups` in one call to `pool`, recording the pool and its revision."""
        top_k = self.config.top_k
        sequences, targets = [], []
        for group in groups:
            for completion in group.completions:
                if completion.token_ids:
                    sequences.append(_sequence(group, completion))
                    targets.append(completion)
                else:
                    completion.teacher_logprobs = []
                    if top_k:
                        completion.teacher_top_k = TeacherTopK.from_rows([], [], top_k)
        if not sequences:
            return
        started = time.perf_counter()
        response = await pool.client.score(sequences, top_k=top_k)
        await self._record_latency((time.perf_counter() - started) * 1000)
        for completion, scores in zip(targets, response.scores, strict=True):
            completion.teacher_logprobs = scores.logprobs
            if top_k:  # the client checked that every scored token has its k alternatives
                assert scores.top_k_ids is not None and scores.top_k_logprobs is not None
                completion.teacher_top_k = TeacherTopK.from_rows(
                    scores.top_k_ids, scores.top_k_logprobs, top_k
                )
        for group in groups:
            group.teacher_revision = response.revision
            group.teacher_pool = pool.name

    async def _record_latency(self, latency_ms: float) -> None:
        """Best effort: the latency only feeds `rlad monitor`, so failing to record it must
        neither hold up nor cost the groups just scored."""
        try:
            await self.queue.record_teacher_latency(latency_ms)
        except Exception as exc:
            log.warning("teacher latency not recorded (%s); the groups go on regardless", exc)

    async def _score_or_refuse(self, deliveries: list[Delivery]) -> dict[str, str]:
        """Score the groups in place. When the teacher refuses the batch as invalid input,
        score each half alone, down to single groups: returns the reason for each group
        refused on its own, by message id."""
        try:
            await self.score_groups([_group(d) for d in deliveries])
            return {}
        except TeacherRequestError as exc:
            if len(deliveries) == 1:
                return {deliveries[0].message_id: str(exc)}
            log.warning(
                "the teacher refused a batch of %d groups (%s); scoring each half alone",
                len(deliveries),
                exc,
            )
        half = len(deliveries) // 2
        refused = await self._score_or_refuse(deliveries[:half])
        return refused | await self._score_or_refuse(deliveries[half:])

    async def _score_or_degrade(self, deliveries: list[Delivery]) -> dict[str, str] | None:
        """`_score_or_refuse`, or None when the batch goes on degraded: with
        `on_teacher_down: grpo`, no teacher has scored for `degrade_after_s` (a call is cut
        when that time runs out). Degraded, the teacher is called only once the client's
        health checks find one again, so that a batch does not wait on a teacher that is
        gone. Otherwise `TeacherUnavailable` propagates: the caller retries."""
        if self.config.on_teacher_down == "wait":
            return await self._score_or_refuse(deliveries)
        assert self.pools is not None
        budget_s = self.answered_at + self.config.degrade_after_s - time.monotonic()
        if budget_s <= 0:  # degraded already
            if not self.pools.reachable():
                self._degrade()
                return None
            budget_s = self.config.degrade_after_s  # the health checks see one: try it
        try:
            return await asyncio.wait_for(self._score_or_refuse(deliveries), budget_s)
        except (TeacherUnavailable, TimeoutError):
            if time.monotonic() - self.answered_at < self.config.degrade_after_s:
                raise
            self._degrade()
            return None

    def _degrade(self) -> None:
        if not self.degraded:
            self.degraded = True
            log.error(
                "no teacher has answered for %.0fs (scorer.degrade_after_s): forwarding groups "
                "unscored, marked degraded and trained as plain GRPO, until a teacher answers "
                "again. Restart or reach the teacher servers to get the distillation back.",
                time.monotonic() - self.answered_at,
            )

    async def process(self, deliveries: list[Delivery]) -> None:
        """Score (in teacher mode) and forward a batch, dead-lettering only the groups the
        teacher refuses on their own; groups whose rewards are all equal go on unscored
        (`skip_zero_variance`), and so does the batch when it degrades. Any error leaves the
        unfinished groups pending."""
        teacher_mode = self.config.mode == "teacher"
        skipped = {
            d.message_id
            for d in deliveries
            if teacher_mode and self.config.skip_zero_variance and _group(d).rewards_all_equal
        }
        to_score = [d for d in deliveries if teacher_mode and d.message_id not in skipped]
        refused = await self._score_or_degrade(to_score) if to_score else {}
        now = time.time()
        for delivery in deliveries:
            group = _group(delivery)
            also = None
            if delivery.message_id in skipped:
                also = "skipped_zero_variance"
            elif refused is None and group.teacher_revision is None and teacher_mode:
                _mark_degraded(group)
                also = "degraded_groups"
            elif refused is not None and delivery.message_id in refused:
                await self.queue.dead_letter(
                    ROLLOUTS, delivery.message_id, refused[delivery.message_id]
                )
                continue
            elif teacher_mode and group.teacher_pool is not None:
                # each pool's throughput, the `default` of a run's one teacher too
                also = scored_by_pool(group.teacher_pool)
            group.timestamps["scored"] = now
            await self.queue.forward(
                ROLLOUTS, delivery.message_id, SCORED, group, counter="scored", also=also
            )

    async def process_until_done(
        self, deliveries: list[Delivery], should_stop: Callable[[], bool]
    ) -> None:
        """Retry while no teacher can score, until stopped; the messages stay pending
        meanwhile, and if another scorer reclaims and forwards them first, our forward is a
        no-op. An unexpected error is logged and leaves them pending too (module docstring)."""
        max_wait_s = TEACHER_RETRY_MAX_S
        if self.config.on_teacher_down == "grpo":  # a wait must not delay the degradation long
            max_wait_s = min(max_wait_s, self.config.degrade_after_s)
        policy = backoff(
            TeacherUnavailable,
            lambda _: should_stop(),
            initial_s=min(TEACHER_RETRY_S, max_wait_s),
            max_s=max_wait_s,
            log=log,
            level=logging.ERROR,
        )
        try:
            await until_stopped(policy(self.process, deliveries), should_stop)
        except (Stopped, TeacherUnavailable):  # stopping
            log.warning(
                "stopped with %d groups unscored; they stay pending for another scorer",
                len(deliveries),
            )
        except RedisError:
            raise  # Redis went away: nothing can be forwarded, the groups stay pending
        except Exception:
            log.exception(
                "scoring %d groups failed unexpectedly; they stay pending and are delivered "
                "again after queue.claim_idle_ms, then one at a time (a group that keeps "
                "failing is dead-lettered after queue.max_deliveries)",
                len(deliveries),
            )

    async def prune_gone_consumers(self) -> None:
        try:
            gone = await self.queue.prune_consumers(ROLLOUTS, keep=self.consumer)
        except RedisError as exc:  # housekeeping: the next round will do
            log.warning("could not prune gone consumers: %s", exc)
            return
        if gone:
            log.info("forgot %d gone scorer consumers: %s", len(gone), ", ".join(gone))

    async def run(self, should_stop: Callable[[], bool]) -> int:
        """Consume and score until stopped, keeping up to `max_in_flight` batches at the
        teacher at once, so that its latency overlaps instead of adding up. Each batch goes
        through `process_until_done` on its own: forwarded (and acknowledged) when it
        finishes, whatever the others do. A Redis error stops the scorer, every unfinished
        batch pending."""
        in_flight: dict[asyncio.Task[None], list[str]] = {}  # batch -> the ids it holds
        done = 0
        pruned_at = -PRUNE_EVERY_S
        try:
            while not should_stop():
                if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    await self.prune_gone_consumers()
                if not await _room(in_flight, self.config.max_in_flight, should_stop):
                    break
                holding = [message_id for ids in in_flight.values() for message_id in ids]
                deliveries = await self.queue.consume(
                    ROLLOUTS, self.consumer, self.config.batch_groups, 500, holding=holding
                )
                if deliveries:
                    work = self._process_all(deliveries, should_stop)
                    in_flight[asyncio.create_task(work)] = [d.message_id for d in deliveries]
                done += len(deliveries)
            # Stopping: each batch gives up within STOP_POLL_S, its groups pending.
            await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:  # only after an error: they are done otherwise
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        log.info("scorer %s stopping after %d groups", self.consumer, done)
        return done

    async def _process_all(
        self, deliveries: list[Delivery], should_stop: Callable[[], bool]
    ) -> None:
        for batch in _batches(deliveries):
            if should_stop():
                break
            await self.process_until_done(batch, should_stop)


async def _room(
    in_flight: dict[asyncio.Task[None], list[str]], most: int, should_stop: Callable[[], bool]
) -> bool:
    """Wait until fewer than `most` batches are in flight, forgetting the finished ones;
    False when asked to stop first. A batch that ended in an error (only a Redis error gets
    this far) raises it here."""
    while True:
        for task in [t for t in in_flight if t.done()]:
            del in_flight[task]
            task.result()
        if len(in_flight) < most:
            return True
        if should_stop():
            return False
        await asyncio.wait(in_flight, timeout=STOP_POLL_S, return_when=asyncio.FIRST_COMPLETED)


def _batches(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """One batch, unless these were delivered before (their batch failed, or its scorer
    died): then one group at a time, so that a group that keeps failing fails alone."""
    if any(d.deliveries > 1 for d in deliveries):
        return [[delivery] for delivery in deliveries]
    return [deliveries] if deliveries else []


def _group(delivery: Delivery) -> RolloutGroup:
    assert delivery.group is not None, "consume() dead-letters undecodable messages"
    return delivery.group


def _mark_degraded(group: RolloutGroup) -> None:
    """Unscored: a call cut short may have left teacher logprobs on some completions."""
    group.degraded = True
    for completion in group.completions:
        completion.teacher_logprobs = None
        completion.teacher_top_k = None


def _sequence(group: RolloutGroup, completion: CompletionRecord) -> ScoreSequence:
    """Prompt + completion, scored from the completion on (a valid request: the group's
    schema guarantees a prompt and non-negative ids)."""
    return ScoreSequence(
        token_ids=group.prompt_token_ids + completion.token_ids,
        start=len(group.prompt_token_ids),
    )
