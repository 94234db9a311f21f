"""`RolloutServerConfig`: everything one rollout server process needs, in one object.

Fields come from keyword arguments, then `RLAD_ROLLOUT_*` environment variables, then the
defaults below; `rlad serve-rollout` maps its options onto them and logs the resolved
config at start-up. The in-process engine takes the same object:

    engine = load_engine(RolloutServerConfig(model="path/to/student", backend="hf"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.http_server import LOOPBACK_HOSTS


class RolloutServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLAD_ROLLOUT_", extra="forbid")

    model: str = Field(description="Hugging Face model id or local folder of the student.")
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Sampling engine: vLLM's async engine or transformers."
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8200, ge=0, le=65535, description="TCP port to bind.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32",
        description="Weights dtype. float32 makes served logprobs match the trainer's fp32 "
        "forward pass to ~1e-5; bfloat16 halves memory at ~1e-2 logprob noise.",
    )
    device: str = Field(
        default="auto", description="HF backend: torch device; `auto` picks cuda when present."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="Longest prompt + completion; default: the model's max_position_embeddings.",
    )
    max_sequences_per_request: int = Field(
        default=4096, ge=1, description="Most prompts x n one request may ask for (413 past it)."
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest /v1/generate body accepted."
    )
    max_weights_bytes: int = Field(
        default=64 * 1024**3, ge=1024, description="Largest weight upload accepted (413)."
    )
    in_flight_policy: Literal["finish", "abort"] = Field(
        default="finish",
        description="What a weight update does to generations already running: let them "
        "finish on the old weights, or abort them (they answer with finish_reason `abort` "
        "and the tokens made so far, all from the old weights).",
    )
    update_timeout_s: float = Field(
        default=300.0,
        gt=0.0,
        description="Longest a weight update may wait for in-flight generations to drain, "
        "and then again to load and probe; past it the update fails with 504 and the old "
        "weights keep serving.",
    )
    upload_idle_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="An upload that sends no bytes for this long fails with 408.",
    )
    require_checksum: bool = Field(
        default=True,
        description="Refuse weight updates that carry no sha256 of their files/body.",
    )
    require_probe: bool = Field(
        default=False,
        description="Refuse weight updates that carry no probe (sender-side logprobs).",
    )
    work_dir: Path | None = Field(
        default=None,
        description="Where uploads are staged and the serving weights are kept for rollback; "
        "default: a temporary folder removed at shutdown. A tmpfs (/dev/shm) makes HTTP "
        "updates ~3x faster to stage when RAM allows two copies of the weights; on the "
        "shared volume's filesystem, file updates are hard-linked instead of copied.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="vLLM backend: share of accelerator memory the engine reserves.",
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0.0,
        description="vLLM backend: KV cache size in GiB; set it on the CPU build (e.g. 1), "
        "where the default share of RAM is too greedy on a shared machine.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM backend: GPUs per model.")
    nccl_weight_transfer: bool = Field(
        default=False,
        description="vLLM on GPUs: also accept weights over vLLM's NCCL weight-transfer engine.",
    )
    policy_version: int = Field(
        default=0,
        ge=0,
        description="Version of the weights the server starts with (e.g. the step of the "
        "checkpoint it loads); every accepted update must carry a larger one.",
    )
    seed: int = Field(default=0, description="Engine seed for requests that give none.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server process."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RolloutServerConfig:
        if self.nccl_weight_transfer and self.backend != "vllm":
            raise ValueError("nccl_weight_transfer needs backend='vllm'")
        if self.kv_cache_gib is not None and self.backend != "vllm":
            raise ValueError("kv_cache_gib applies to backend='vllm' only")
        return self

    @property
    def loopback_only(self) -> bool:
        """Bound to loopback: only local processes can reach the weight endpoints."""
        return self.host in LOOPBACK_HOSTS
