"""One experiment, one YAML: the configuration every pipeline process reads.

`rlad up`, `rlad rollout-worker`, `rlad scorer` and `rlad train` all take `--config FILE`;
addresses (Redis, servers) can be overridden per process on the command line or by the
environment, which is how docker compose and `rlad up` wire the processes together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from services.queue.streams import QueueConfig
from services.tasks import TaskConfig
from trainer.algorithm import AlgorithmConfig
from trainer.config import TrainerConfig


class ServerSpec(BaseModel):
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="Inference engine.")
    kv_cache_gib: int = Field(
        default=1, ge=1, description="vLLM CPU build: RAM reserved for the KV cache (GiB)."
    )
    extra_args: list[str] = Field(default_factory=list, description="More `rlad serve-*` flags.")


class RolloutWorkerConfig(BaseModel):
    group_size: int = Field(default=8, ge=2, description="Completions per prompt (G).")
    prompts_per_request: int = Field(default=4, ge=1, description="Prompts per /v1/generate.")
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=160, ge=1, description="Completion length limit.")
    seed: int = Field(default=0)
    synchronous: bool = Field(
        default=False,
        description="Strictly on-policy: after one trainer batch of groups, wait until the "
        "trainer has pushed the next version (no overlap of generation and training).",
    )


class ScorerConfig(BaseModel):
    mode: Literal["teacher", "passthrough"] = Field(
        default="teacher", description="`passthrough` skips the teacher (plain GRPO)."
    )
    batch_groups: int = Field(default=4, ge=1, description="Groups scored per teacher call.")
    deadline_s: float = Field(default=120.0, gt=0.0, description="Per-call teacher deadline.")


class RunConfig(BaseModel):
    name: str = Field(default="run", description="Run name; the run folder is run_dir/name.")
    run_dir: Path = Field(default=Path("runs"), description="Where run folders are written.")
    student: str = Field(description="Student model id or path (also the initial policy).")
    teacher: str | None = Field(default=None, description="Teacher model id or path.")
    teacher_urls: list[str] = Field(
        default_factory=list, description="Remote teachers; when set, none is started locally."
    )
    task: TaskConfig = Field(description="Where prompts come from and how they are rewarded.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    rollout: RolloutWorkerConfig = Field(default_factory=RolloutWorkerConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    rollout_server: ServerSpec = Field(default_factory=ServerSpec)
    teacher_server: ServerSpec = Field(default_factory=ServerSpec)
    cpu_placement: bool = Field(
        default=True,
        description="`rlad up` without a GPU: the vLLM engines share half of the cores and the "
        "trainer has the other half (services/launch/cpu_placement.py).",
    )

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> RunConfig:
        needs_teacher = self.algorithm.uses_teacher
        if needs_teacher and self.scorer.mode == "passthrough":
            raise ValueError(
                f"algorithm {self.algorithm.name!r} needs teacher logprobs, but scorer.mode is "
                "'passthrough': use algorithm.name 'grpo' or scorer.mode 'teacher'"
            )
        if self.scorer.mode == "teacher" and not (self.teacher or self.teacher_urls):
            raise ValueError("scorer.mode 'teacher' needs `teacher` (a model) or `teacher_urls`")
        if (
            self.rollout.synchronous
            and self.trainer.batch_prompts % self.rollout.prompts_per_request
        ):
            raise ValueError(
                "rollout.synchronous needs trainer.batch_prompts to be a multiple of "
                "rollout.prompts_per_request, so that a batch ends on a request boundary"
            )
        if self.trainer.temperature != self.rollout.temperature:
            raise ValueError(
                "trainer.temperature must equal rollout.temperature, so that trainer logprobs "
                "are taken under the distribution the samples were drawn from"
            )
        return self

    @property
    def folder(self) -> Path:
        return self.run_dir / self.name


def load_run_config(path: Path, overrides: dict[str, object] | None = None) -> RunConfig:
    """Parse a YAML experiment file; `overrides` maps dotted keys to values."""
    data = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return RunConfig.model_validate(data)


def dump_run_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
