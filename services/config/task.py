"""The `task:` block of a run config: where prompts come from and how they are rewarded.

A union tagged by `name` (`kk` or `math`); each variant carries only its own options,
directly under `task:`. `services.tasks.load_task` turns it into a task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from services.config.base import StrictModel


class TaskBase(StrictModel):
    # Old configs nested each task's options in a block named after it.
    retired: ClassVar[Mapping[str, str]] = {
        variant: f"{{path}} is gone: put its keys directly under {{parent}}, next to "
        f"{{parent}}.name: {variant}"
        for variant in ("kk", "math")
    }

    # Each variant narrows it to its own tag; declared here so that it comes first.
    name: str = Field(description="Which task: kk or math.")
    seed: int = Field(default=0, description="Fixes the held-out evaluation set.")


class KKTaskConfig(TaskBase):
    """Knights and Knaves puzzles, generated (docs/design.md#tasks-rewards-and-evaluation)."""

    name: Literal["kk"] = Field(default="kk", description="Knights and Knaves.")
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


class MathTaskConfig(TaskBase):
    """Math problems from local files or a Hugging Face dataset, rewarded by the answer."""

    name: Literal["math"] = Field(default="math", description="Math word problems.")
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

    @model_validator(mode="after")
    def _has_data(self) -> MathTaskConfig:
        if not (self.train_path or self.eval_path or self.hf_dataset):
            raise ValueError("task `math` needs train_path, eval_path or hf_dataset")
        return self


TaskConfig = Annotated[KKTaskConfig | MathTaskConfig, Field(discriminator="name")]
