"""Tasks: where prompts come from and how completions are rewarded
(docs/design.md#tasks-rewards-and-evaluation).

A task yields `Problem`s — an endless, seeded training stream and a fixed held-out
evaluation set disjoint from it — and scores a decoded completion with `reward`. The
rollout worker tokenizes `problem.prompt`, samples completions and calls `task.reward`;
`rlad eval` and `rlad bootstrap` use the same two methods.

    task = load_task(KKTaskConfig(people=[2, 3]))
    problem = next(task.problems("train", seed=0))
    task.reward(problem, completion_text).score
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from services.config.task import KKTaskConfig, TaskConfig

Split = Literal["train", "eval"]


class Problem(BaseModel):
    prompt_id: str = Field(description="Stable id: the same problem always has the same id.")
    prompt: str = Field(description="The full prompt text to tokenize, template included.")
    subset: str = Field(description="Evaluation subset, e.g. `PPL3` or a benchmark name.")
    answer: str = Field(description="The gold answer the reward compares against.")
    reference: str | None = Field(
        default=None,
        description="A worked reference completion (for SFT), when the task can write one.",
    )


class Reward(BaseModel):
    score: float = Field(description="The scalar reward of the completion.")
    correct: bool = Field(description="Whether the final answer is right (for accuracy).")
    format_ok: bool = Field(description="Whether the completion followed the answer format.")


class Task(Protocol):
    name: str

    def problems(self, split: Split, seed: int = 0) -> Iterator[Problem]:
        """`train`: endless stream ordered by `seed`; `eval`: the fixed held-out set."""
        ...

    def reward(self, problem: Problem, completion_text: str) -> Reward: ...


def load_task(config: TaskConfig) -> Task:
    """The task `config` names, ready to yield problems and score completions."""
    if isinstance(config, KKTaskConfig):
        from services.tasks.kk import KKTask

        return KKTask(config)
    from services.tasks.math import MathTask

    return MathTask(config)
