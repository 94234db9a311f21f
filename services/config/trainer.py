"""The `trainer:` block of a run config (`rlad train`): optimisation, batching, DeepSpeed,
staleness, checkpoints and weight pushes. The loss itself is the `algorithm:` block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from services.config.base import StrictModel


class TrainerConfig(StrictModel):
    retired: ClassVar[Mapping[str, str]] = {
        "temperature": "{path} moved to rollout.temperature: one temperature, read by "
        "sampling and by the trainer's logprobs alike",
    }

    steps: int = Field(default=30, ge=1, description="Optimizer steps (one per global batch).")
    batch_prompts: int = Field(
        default=8, ge=1, description="Prompt groups per global batch (B); each holds G samples."
    )
    lr: float = Field(default=1e-5, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear LR warm-up, then constant.")
    grad_clip: float = Field(default=1.0, gt=0.0, description="Global gradient-norm clip.")
    micro_batch_tokens: int = Field(
        default=8192,
        ge=64,
        description="Token budget of one forward/backward micro-batch (dynamic micro-batching).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="Training precision of the weights and activations (the loss is always "
        "computed in fp32); `auto`: bf16 on a GPU, fp32 on the CPU.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass instead of keeping them: "
        "about a third more compute for much less memory (a 1.7B-8B student on one GPU).",
    )
    teacher_revision: str | dict[str, str] | None = Field(
        default=None,
        description="The teacher weights (revision, as the teacher's /v1/info reports it) to "
        "train with, per teacher pool (`{pool: revision}`; a plain revision with one pool); "
        "groups scored by another are dead-lettered. Default: each pool's first scored "
        "group's, kept in the checkpoint across resumes.",
    )
    max_staleness: int = Field(
        default=2,
        ge=0,
        description="Groups sampled more than this many versions behind are dropped (counted).",
    )
    checkpoint_every: int = Field(
        default=10, ge=1, description="Checkpoint (and acknowledge consumed groups) every N steps."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest checkpoints kept on disk.")
    push_transport: Literal["auto", "nccl", "cuda_ipc", "http", "file"] = Field(
        default="auto",
        description="How new weights reach the rollout servers: `nccl` (vLLM servers on other "
        "GPUs join the trainer's NCCL group), `cuda_ipc` (transformers servers on the "
        "trainer's host read its GPU memory), `http` (streamed safetensors), `file` (a "
        "shared volume). `auto`: the device path each server accepts when the trainer has a "
        "GPU, else http.",
    )
    push_bucket_mb: int = Field(
        default=512,
        ge=1,
        description="Device pushes: MiB of weights gathered (at ZeRO-3) and sent at a time, "
        "so that no GPU ever holds a second full copy of the model.",
    )
    probe_atol: float | None = Field(
        default=None,
        gt=0.0,
        description="Largest |served - sent| logprob the weight probe accepts; default 1e-3 "
        "when training in fp32, 0.05 in bf16 (bf16 kernels differ by more between engines).",
    )
    push_timeout_s: float = Field(
        default=120.0,
        gt=0.0,
        description="Deadline of the trainer's calls to the rollout servers (weight pushes, "
        "version checks): how long a server that is unreachable or still loading is retried "
        "before the trainer fails.",
    )
    seed: int = Field(default=0, description="Seeds the trainer's torch generator.")
    tensorboard: bool = Field(default=False, description="Also log to TensorBoard (run_dir/tb).")
    wandb_project: str | None = Field(default=None, description="Also log to this wandb project.")

    @model_validator(mode="after")
    def _checkpoint_within_run(self) -> TrainerConfig:
        if self.checkpoint_every > self.steps:
            self.checkpoint_every = self.steps
        return self
