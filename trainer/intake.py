"""Which scored groups the trainer can train on, and why not the others.

The wire schema (`services.common.protocol`) already refuses a group whose completions
are malformed in themselves (a logprob row of another length than the tokens, a value that
is no finite logprob): the queue dead-letters it as undecodable. What is checked here
depends on the run: the group size the rollout worker samples (the advantages are one
[groups, G] tensor), the student's vocabulary, the algorithm's inputs (teacher logprobs
wherever the loss reads them: not in a degraded group, nor, but under KDRL, in a group of
equal rewards; and under KDRL's `topk` estimator, the teacher's top-k of the run's k at
every token, with ids in the student's vocabulary), and the teacher's
weights: each teacher pool (the `teacher_pool` that scored a group; `default` when the
run has one) is pinned to one revision (`trainer.teacher_revision`, or else the pool's
first scored group's, kept in the checkpoint across resumes), so that two replicas of a
pool serving different weights are never mixed silently, while two pools may serve
different teachers. A group that fails is dead-lettered with the reason, and the trainer
goes on: content must never stop it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.common.protocol import RolloutGroup
from services.config.teachers import DEFAULT_POOL

log = logging.getLogger(__name__)


@dataclass
class Intake:
    group_size: int  # rollout.group_size: completions per prompt
    vocab_size: int  # the student's vocabulary: ids 0..vocab_size-1
    algorithm: str  # algorithm.name, for the reasons
    needs_teacher: bool  # the loss reads teacher logprobs (TRRD, KDRL)
    teacher_on_every_group: bool  # even where the advantages are 0 (KDRL's KD term)
    # Pinned revision per teacher pool; a pool not in it: its first scored group's.
    teacher_revisions: dict[str, str] = field(default_factory=dict)
    top_k: int = 0  # scorer.top_k, when the loss reads the teacher's top-k (KDRL topk); else 0

    def problem(self, group: RolloutGroup | None) -> str | None:
        """Why the trainer cannot use `group`, or None when it can."""
        if group is None:
            return "payload could not be decoded"
        if len(group.completions) != self.group_size:
            return (
                f"{len(group.completions)} completions, where the trainer's config has "
                f"rollout.group_size {self.group_size}: give the rollout worker and the "
                "trainer the same config"
            )
        ids = group.prompt_token_ids + [t for c in group.completions for t in c.token_ids]
        outside = [t for t in ids if t >= self.vocab_size]
        if outside:
            return (
                f"token id {outside[0]} is outside the student's vocabulary "
                f"(0..{self.vocab_size - 1}), {len(outside)} such ids: the rollout server "
                "must serve this student"
            )
        if self.needs_teacher and not group.degraded:
            unscored = [
                i
                for i, c in enumerate(group.completions)
                if c.token_ids and c.teacher_logprobs is None
            ]
            # A group of equal rewards has advantages of 0: without a KD term, its loss
            # reads no teacher logprob, and the scorer skips the teacher for it.
            needed = self.teacher_on_every_group or not group.rewards_all_equal
            if unscored and needed:
                return (
                    f"completions {unscored} have no teacher_logprobs, which algorithm "
                    f"{self.algorithm} needs: run the scorer in teacher mode"
                )
            if self.top_k:
                problem = self._top_k_problem(group)
                if problem is not None:
                    return problem
        return self._revision_problem(group)

    def _top_k_problem(self, group: RolloutGroup) -> str | None:
        scored = [c for c in group.completions if c.token_ids]
        missing = [
            i for i, c in enumerate(group.completions) if c.token_ids and c.teacher_top_k is None
        ]
        if missing:
            return (
                f"completions {missing} have no teacher top-k, which kd_estimator topk "
                f"needs: run the scorer with scorer.top_k {self.top_k}"
            )
        for completion in scored:
            assert completion.teacher_top_k is not None
            top_k = completion.teacher_top_k
            if top_k.k != self.top_k:
                return (
                    f"teacher top-k of k = {top_k.k}, where this run's scorer.top_k is "
                    f"{self.top_k}: give the scorer and the trainer the same config"
                )
            largest = int(top_k.id_array().max(initial=0))
            if largest >= self.vocab_size:
                return (
                    f"teacher top-k id {largest} is outside the student's vocabulary "
                    f"(0..{self.vocab_size - 1}): the teacher must share the student's tokenizer"
                )
        return None

    def resume_pins(self, restored: dict[str, str]) -> None:
        """Take back the revisions a checkpoint was pinned to; trainer.teacher_revision,
        already here, wins where the two differ (a run moved on to other weights on purpose)."""
        for pool, revision in restored.items():
            pinned = self.teacher_revisions.setdefault(pool, revision)
            if pinned != revision:
                log.warning(
                    "teacher pool %s: the checkpoint was pinned to revision %s, "
                    "trainer.teacher_revision pins it to %s now",
                    pool,
                    revision,
                    pinned,
                )

    def _revision_problem(self, group: RolloutGroup) -> str | None:
        scored = any(c.teacher_logprobs is not None for c in group.completions)
        if not scored or group.teacher_revision is None:
            return None
        pool = group.teacher_pool or DEFAULT_POOL
        pinned = self.teacher_revisions.get(pool)
        if pinned is None:
            self.teacher_revisions[pool] = group.teacher_revision
            log.info(
                "teacher pool %s pinned to revision %s (its first scored group's)",
                pool,
                group.teacher_revision,
            )
            return None
        if group.teacher_revision != pinned:
            return (
                f"scored by teacher revision {group.teacher_revision} of pool {pool}, but this "
                f"run pins pool {pool} to {pinned}: every replica of a pool must serve the "
                "same weights (or set trainer.teacher_revision to the one to train with)"
            )
        return None
