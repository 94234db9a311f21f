"""Which scored groups the trainer can train on, and why not the others.

The wire schema (`services.common.protocol`) already refuses a group whose completions
are malformed in themselves (a logprob row of another length than the tokens, a value that
is no finite logprob): the queue dead-letters it as undecodable. What is checked here
depends on the run: the group size the rollout worker samples (the advantages are one
[groups, G] tensor), the student's vocabulary, the algorithm's inputs (teacher logprobs
wherever the loss reads them: not in a degraded group, nor, but under KDRL, in a group of
equal rewards; and under KDRL's `topk` estimator, the teacher's top-k of the run's k at
every token, with ids in the student's vocabulary), and the teacher's
weights: the run is pinned to one teacher revision (`trainer.teacher_revision`, or else
the first scored group's), so that two replicas serving different weights are never mixed
silently. A group that fails is dead-lettered with the reason, and the trainer goes on:
content must never stop it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.common.protocol import RolloutGroup

log = logging.getLogger(__name__)


@dataclass
class Intake:
    group_size: int  # rollout.group_size: completions per prompt
    vocab_size: int  # the student's vocabulary: ids 0..vocab_size-1
    algorithm: str  # algorithm.name, for the reasons
    needs_teacher: bool  # the loss reads teacher logprobs (TRRD, KDRL)
    teacher_on_every_group: bool  # even where the advantages are 0 (KDRL's KD term)
    teacher_revision: str | None = None  # pinned; None: the first scored group's
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

    def _revision_problem(self, group: RolloutGroup) -> str | None:
        scored = any(c.teacher_logprobs is not None for c in group.completions)
        if not scored or group.teacher_revision is None:
            return None
        if self.teacher_revision is None:
            self.teacher_revision = group.teacher_revision
            log.info(
                "teacher revision pinned to %s (the first scored group's)", group.teacher_revision
            )
            return None
        if group.teacher_revision != self.teacher_revision:
            return (
                f"scored by teacher revision {group.teacher_revision}, but this run is pinned "
                f"to {self.teacher_revision}: every teacher replica must serve the same "
                "weights (or set trainer.teacher_revision to the one to train with)"
            )
        return None
