"""Tasks: where prompts come from and how completions are rewarded (DESIGN.md section 5).

A task yields `Problem`s — an endless, seeded training stream and a fixed held-out
evaluation set disjoint from it — and scores a decoded completion with `reward`. The
rollout worker tokenizes `problem.prompt`, samples completions and calls `task.reward`;
`rlad eval` and `rlad bootstrap` use the same two methods.

    task = load_task(TaskConfig(name="kk", kk=KKTaskConfig(people=[2, 3])))
    problem = next(task.problems("train", seed=0))
    task.reward(problem, completion_text).score
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

from pydantic import BaseModel, Field, model_validator

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


class KKTaskConfig(BaseModel):
    people: list[int] = Field(
        default=[2, 3, 4, 5, 6, 7, 8],
        description="Numbers of people to generate; each is a subset PPL<n>. The training "
        "stream draws n uniformly from this list.",
    )
    rendering: Literal["natural", "compact"] = Field(
        default="natural",
        description="`natural`: the K&K benchmark's English inside Logic-RL's chat prompt; "
        "`compact`: symbolic lines for character-level tiny models.",
    )
    depth: int = Field(default=2, ge=1, le=4, description="Statement nesting depth (K&K: 2).")
    width: int = Field(default=2, ge=2, le=4, description="Most operands of and/or (K&K: 2).")
    eval_per_subset: int = Field(default=100, ge=1, description="Held-out puzzles per PPL<n>.")

    @model_validator(mode="after")
    def _people_range(self) -> KKTaskConfig:
        if not self.people or any(n < 2 or n > 8 for n in self.people):
            raise ValueError(f"people must be numbers in 2..8 (PPL2..PPL8), got {self.people}")
        return self


class MathTaskConfig(BaseModel):
    train_path: str | None = Field(
        default=None, description="Local JSONL or Parquet file of training problems."
    )
    eval_path: str | None = Field(
        default=None, description="Local JSONL or Parquet file of evaluation problems."
    )
    hf_dataset: str | None = Field(
        default=None, description="Hugging Face dataset name, used when no path is given."
    )
    hf_config: str | None = Field(default=None, description="Dataset configuration name.")
    train_split: str = Field(default="train", description="HF split for training.")
    eval_split: str = Field(default="test", description="HF split for evaluation.")
    problem_field: str = Field(default="problem", description="Field holding the question.")
    answer_field: str = Field(default="answer", description="Field holding the gold answer.")
    subset_field: str | None = Field(
        default=None, description="Field naming each row's subset (default: one subset)."
    )
    solution_field: str | None = Field(
        default=None, description="Field with a worked solution, used as SFT reference."
    )
    subset_name: str = Field(default="math", description="Subset name when none is mapped.")
    eval_size: int | None = Field(
        default=None, ge=1, description="Use only the first N evaluation rows."
    )
    prompt_template: str = Field(
        default="{problem}\nPlease reason step by step, and put your final answer within "
        "\\boxed{{}}.",
        description="Prompt text; `{problem}` is replaced by the question.",
    )


class TaskConfig(BaseModel):
    name: Literal["kk", "math"] = Field(description="Which task: Knights and Knaves or math.")
    seed: int = Field(default=0, description="Fixes the held-out evaluation set.")
    kk: KKTaskConfig = Field(default_factory=KKTaskConfig, description="Options for `kk`.")
    math: MathTaskConfig = Field(default_factory=MathTaskConfig, description="Options for `math`.")

    @model_validator(mode="after")
    def _math_has_data(self) -> TaskConfig:
        source = self.math.train_path or self.math.eval_path or self.math.hf_dataset
        if self.name == "math" and not source:
            raise ValueError("task `math` needs math.train_path/eval_path or math.hf_dataset")
        return self


def load_task(config: TaskConfig) -> Task:
    """The task named by `config`, ready to yield problems and score completions."""
    if config.name == "kk":
        from services.tasks.kk import KKTask

        return KKTask(config.kk, config.seed)
    from services.tasks.math import MathTask

    return MathTask(config.math, config.seed)
