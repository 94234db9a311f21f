"""One experiment, one YAML: the configuration every pipeline process reads.

`rlad up`, `rlad serve-rollout`, `rlad serve-teacher`, `rlad rollout-worker`, `rlad scorer`
and `rlad train` all take `--config FILE`; each reads the whole tree and uses its blocks.
Addresses (Redis, servers) can be overridden per process on the command line or by the
environment, which is how docker compose and `rlad up` wire the processes together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from services.config.algorithm import AlgorithmConfig, TrrdConfig
from services.config.base import ConfigError, StrictModel, explain
from services.config.cluster import ClusterConfig
from services.config.servers import RolloutServerConfig, TeacherServerConfig
from services.config.task import TaskConfig
from services.config.teachers import (
    TeacherPoolConfig,
    as_pools,
    check_pools,
    pinned_revisions,
)
from services.config.trainer import TrainerConfig
from services.config.workers import QueueConfig, RolloutWorkerConfig, ScorerConfig

# Letters, digits, `.`, `_`, `-`: the name is part of a folder name and of Redis keys.
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Server block -> the run's model it serves.
SERVED_MODELS = {"rollout_server": "student", "teacher_server": "teacher"}


class RunConfig(StrictModel):
    name: str = Field(
        default="run",
        pattern=RUN_NAME_PATTERN,
        description="Run name: the run folder is run_dir/name, and it scopes the run's Redis "
        "keys, so runs with different names can share one Redis.",
    )
    run_dir: Path = Field(default=Path("runs"), description="Where run folders are written.")
    student: str = Field(description="Student model id or path (also the initial policy).")
    teacher: str | None = Field(default=None, description="Teacher model id or path.")
    teacher_urls: list[TeacherPoolConfig] = Field(
        default_factory=list,
        description="Remote teachers; when set, none is started locally. A list of URLs (the "
        "replicas of one teacher), or a list of pools, each a teacher with its replicas and "
        "the groups it scores (services/config/teachers.py). `http://host:8100` is an rlad "
        "teacher server (`rlad serve-teacher`); `openai+http://host:8000/v1` an "
        "OpenAI-compatible server (`vllm serve ... --dtype float32`) scored through its "
        "completions API with vLLM's prompt_logprobs.",
    )
    task: TaskConfig = Field(description="Where prompts come from and how they are rewarded.")
    algorithm: AlgorithmConfig = Field(
        default_factory=TrrdConfig, description="The RL update: trrd, grpo or kdrl."
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="`rlad train`.")
    rollout: RolloutWorkerConfig = Field(
        default_factory=RolloutWorkerConfig, description="`rlad rollout-worker`: sampling."
    )
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="`rlad scorer`.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="The Redis streams.")
    rollout_server: RolloutServerConfig = Field(
        description="`rlad serve-rollout`; its model is `student`."
    )
    teacher_server: TeacherServerConfig | None = Field(
        default=None, description="`rlad serve-teacher`; its model is `teacher`."
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="`rlad up --ray`: the Ray cluster, each role's resources and replicas.",
    )
    cpu_placement: bool = Field(
        default=True,
        description="`rlad up` without a GPU: the vLLM engines share half of the cores and the "
        "trainer has the other half (services/launch/cpu_placement.py).",
    )

    @field_validator("teacher_urls", mode="before")
    @classmethod
    def _plain_urls_are_one_pool(cls, value: Any) -> Any:
        return as_pools(value)

    @model_validator(mode="before")
    @classmethod
    def _servers_serve_the_run_models(cls, data: Any) -> Any:
        """A server's `model` is the run's `student` / `teacher`: filled in, never set twice."""
        if not isinstance(data, dict):
            return data
        if data.get("student") is None:
            raise ValueError("student is required: the model to train")
        data = dict(data)
        for block, key in SERVED_MODELS.items():
            settings, model = data.get(block), data.get(key)
            if model is None:  # no teacher: remote ones, or none needed
                if settings is not None:
                    raise ValueError(f"{block} configures a local teacher: set `{key}` too")
                continue
            settings = {} if settings is None else settings
            if isinstance(settings, dict):
                if settings.get("model", model) != model:
                    raise ValueError(f"{block}.model is `{key}`: set only `{key}`")
                data[block] = {**settings, "model": model}
        return data

    @model_validator(mode="after")
    def _rollout_server_reads_the_trainer_files(self) -> RunConfig:
        """The trainer's file push writes under <run folder>/weights: by default, that is
        the one folder the run's rollout server reads file updates from."""
        if self.rollout_server.weights_dir is None:
            self.rollout_server.weights_dir = self.folder / "weights"
        return self

    @model_validator(mode="after")
    def _kdrl_scores_every_group(self) -> RunConfig:
        """KDRL's KD term reads the teacher on groups of equal rewards too: the scorer must
        not skip them, whatever scorer.skip_zero_variance says (its default is on)."""
        if self.algorithm.teacher_on_every_group:
            self.scorer.skip_zero_variance = False
        return self

    @model_validator(mode="after")
    def _top_k_when_needed(self) -> RunConfig:
        """KDRL's `topk` estimator reads the teacher's top-k, which only a scorer asking
        for it stores; a local teacher must serve that many."""
        needs = self.algorithm.teacher_top_k
        if needs and self.scorer.top_k == 0:
            raise ValueError(
                "algorithm.kd_estimator 'topk' needs the teacher's top-k ids and logprobs, "
                "but scorer.top_k is 0: set scorer.top_k (e.g. 8; at most 64), or use "
                "kd_estimator k1, k2 or k3"
            )
        server = self.teacher_server
        if server is not None and self.scorer.top_k > server.max_top_k:
            raise ValueError(
                f"scorer.top_k {self.scorer.top_k} exceeds teacher_server.max_top_k "
                f"{server.max_top_k}: the teacher would refuse every request; lower "
                "scorer.top_k or raise teacher_server.max_top_k"
            )
        return self

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> RunConfig:
        if self.algorithm.uses_teacher and self.scorer.mode == "passthrough":
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
        return self

    @model_validator(mode="after")
    def _teacher_pools_route_every_group(self) -> RunConfig:
        if self.teacher_urls:
            check_pools(self.teacher_urls, self.task.name)
        pinned_revisions(self.trainer.teacher_revision, self.teacher_urls)  # refuses a bad one
        return self

    @property
    def folder(self) -> Path:
        return self.run_dir / self.name

    @property
    def teacher_revisions(self) -> dict[str, str]:
        """trainer.teacher_revision as a revision per teacher pool name."""
        return pinned_revisions(self.trainer.teacher_revision, self.teacher_urls)


def load_run_config(path: Path, overrides: dict[str, object] | None = None) -> RunConfig:
    """Parse a YAML experiment file; `overrides` maps dotted keys to values.

    Raises `ConfigError` naming the file and every problem (see `services.config.base`).
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of keys, not {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, RunConfig, str(path))) from None


def dump_run_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
