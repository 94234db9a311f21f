"""Synthetic groups for tests: a small fixed one for the queue, and scored ones for the
trainer (random tokens, fixed logprobs, rewards 0/1), or the same before a scorer's turn."""

from __future__ import annotations

import random

from services.common.protocol import CompletionRecord, RolloutGroup


def scored_group(index: int, rng: random.Random, teacher: bool = True) -> RolloutGroup:
    """Four completions of 3..8 random tokens with rewards 0/1, scored by a teacher (fixed
    logprobs); with `teacher=False`, as a rollout worker publishes it, for a scorer to score."""
    prompt = [rng.randrange(2, 90) for _ in range(6)]
    completions = []
    for j in range(4):
        n = rng.randrange(3, 9)
        completions.append(
            CompletionRecord(
                token_ids=[rng.randrange(2, 90) for _ in range(n)],
                rollout_logprobs=[-4.5] * n,
                teacher_logprobs=[-3.0 - 0.1 * k for k in range(n)] if teacher else None,
                reward=float(j % 2),
                correct=bool(j % 2),
                finish_reason="stop",
            )
        )
    return RolloutGroup(
        group_id=f"group-{index}",
        prompt_id=f"p{index}",
        task="synthetic",
        policy_version=0,
        prompt_token_ids=prompt,
        completions=completions,
    )


def small_group(i: int, version: int = 0) -> RolloutGroup:
    """A one-completion group, `g<i>`, as the queue tests pass around."""
    return RolloutGroup(
        group_id=f"g{i}",
        prompt_id=f"p{i}",
        task="test",
        policy_version=version,
        prompt_token_ids=[1, 2, 3],
        completions=[
            CompletionRecord(
                token_ids=[4, 5], rollout_logprobs=[-0.5, -1.25], reward=1.0, finish_reason="stop"
            )
        ],
    )
