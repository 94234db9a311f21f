"""`TeacherServerConfig`: everything one teacher server process needs, in one object.

Fields come from keyword arguments, then `RLAD_TEACHER_*` environment variables, then the
defaults below; `rlad serve-teacher` maps its options onto them and logs the resolved
config at start-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TeacherServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLAD_TEACHER_", extra="forbid")

    model: str = Field(description="Hugging Face model id or local folder of the teacher.")
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Scoring engine: vLLM `prompt_logprobs` or transformers."
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8100, ge=0, le=65535, description="TCP port to bind.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="auto",
        description="Weights and activations dtype; `auto` keeps the checkpoint's dtype. "
        "Logprobs are always returned in float32.",
    )
    device: str = Field(
        default="auto", description="HF backend: torch device; `auto` picks cuda when present."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="Longest sequence accepted; default: the model's max_position_embeddings.",
    )
    max_batch_tokens: int = Field(
        default=16384,
        ge=1,
        description="Token budget of one engine call: concurrent requests are coalesced up to "
        "it, and the HF backend pads micro-batches to at most this many tokens.",
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        description="How long the first request of a batch waits for others to join it.",
    )
    dynamic_batching: bool = Field(
        default=True,
        description="Coalesce concurrent requests; off: one request per engine call.",
    )
    max_queue_tokens: int = Field(
        default=262144,
        ge=1,
        description="Admission bound: tokens waiting or being scored. Past it requests get "
        "429 with Retry-After, so memory stays bounded under any load.",
    )
    max_request_tokens: int = Field(
        default=131072, ge=1, description="Most tokens one request may carry (413 past it)."
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted (413)."
    )
    max_top_k: int = Field(default=64, ge=0, le=64, description="Largest `top_k` accepted.")
    length_bucket: int = Field(
        default=64,
        ge=1,
        description="HF backend: sequences are padded up to a multiple of this, and only "
        "sequences of the same bucket share a forward pass, so little compute goes to padding.",
    )
    cache_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Byte budget of the LRU logprob cache (0 disables it).",
    )
    inject_latency_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="Adds this delay to every /v1/score request, to model a remote teacher "
        "in benchmarks.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="vLLM backend: share of accelerator memory (of RAM on the CPU build) "
        "the engine reserves.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="vLLM backend: skip graph compilation (faster start-up, e.g. on CPU).",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM backend: GPUs per model.")
    seed: int = Field(default=0, description="Engine seed (scoring itself is deterministic).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server process."
    )

    @model_validator(mode="after")
    def _budgets_fit(self) -> TeacherServerConfig:
        if self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError(
                f"max_queue_tokens ({self.max_queue_tokens}) must be at least max_batch_tokens "
                f"({self.max_batch_tokens}), or no batch could ever fill"
            )
        if self.max_request_tokens > self.max_queue_tokens:
            raise ValueError(
                f"max_request_tokens ({self.max_request_tokens}) exceeds max_queue_tokens "
                f"({self.max_queue_tokens}): such a request could never be admitted"
            )
        if self.max_model_len is not None and self.max_model_len > self.max_request_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds max_request_tokens "
                f"({self.max_request_tokens}): a single full-length sequence would be refused"
            )
        return self
