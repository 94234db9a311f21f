"""The two servers' settings: `RolloutServerConfig` (`rlad serve-rollout`) and
`TeacherServerConfig` (`rlad serve-teacher`), with what both share in `ServerConfig`.

A run config holds them as its `rollout_server:` and `teacher_server:` blocks (their
`model` is the run's student and teacher); standalone, they are built from keyword
arguments (the options of `rlad serve-*` are generated from these fields). Either way, a
field left out comes from its `RLAD_ROLLOUT_*` / `RLAD_TEACHER_*` environment variable
when one is set, else from the default below. In-process engines take the same objects:

    engine = load_engine(RolloutServerConfig(model="path/to/student", backend="hf"))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.protocol import INT64_MAX

# Hosts only local processes can reach: a server bound to one needs no key for weights.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class ServerConfig(BaseSettings):
    """What both servers have: the model, the address, the engine and its limits."""

    model_config = SettingsConfigDict(extra="forbid")

    # See `services.config.base.StrictModel.retired`.
    retired: ClassVar[Mapping[str, str]] = {
        "extra_args": "{path} is gone: set each `rlad serve-*` flag as a field of {parent} "
        "instead (`--max-model-len 512` becomes {parent}.max_model_len: 512)",
    }

    model: str = Field(description="Hugging Face model id or local folder.")
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Inference engine: vLLM or transformers."
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(ge=0, le=65535, description="TCP port to bind.")
    dtype: Dtype = Field(description="Weights dtype.")
    device: str = Field(
        default="auto", description="HF backend: torch device; `auto` picks cuda when present."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="Longest sequence (prompt + completion); default: the model's "
        "max_position_embeddings.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted (413)."
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="A request body (other than a weight upload) must arrive within this long "
        "(408 past it).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="A request's headers must be complete this long after its first byte (or "
        "after the connection opened); past it the connection is closed.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="vLLM backend: share of accelerator memory (of RAM on the CPU build) the "
        "engine reserves.",
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0.0,
        description="vLLM backend: KV cache size in GiB; set it on the CPU build (e.g. 1), "
        "where the default share of RAM is too greedy on a shared machine.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM backend: GPUs per model.")
    seed: int = Field(default=0, description="Engine seed.")
    drain_grace_s: float = Field(
        default=4.0,
        ge=0.0,
        description="A registered server (`--register`) stopped by SIGTERM says it is "
        "draining and keeps serving this long, so that every client following the registry "
        "(they look every 2 s) has moved elsewhere before it waits for its last requests.",
    )
    drain_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="A draining server (see drain_grace_s) waits at most this long, grace "
        "included, for its requests in flight before it exits.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server process."
    )

    @model_validator(mode="after")
    def _vllm_settings_need_vllm(self) -> ServerConfig:
        if self.kv_cache_gib is not None and self.backend != "vllm":
            raise ValueError("kv_cache_gib applies to backend='vllm' only")
        return self

    @property
    def kv_cache_bytes(self) -> int | None:
        """`kv_cache_gib` as vLLM's `kv_cache_memory_bytes`."""
        return None if self.kv_cache_gib is None else int(self.kv_cache_gib * 1024**3)

    @property
    def loopback_only(self) -> bool:
        """Bound to loopback: only local processes can reach it."""
        return self.host in LOOPBACK_HOSTS


class RolloutServerConfig(ServerConfig):
    """The student's sampling server, with versioned weight updates."""

    model_config = SettingsConfigDict(env_prefix="RLAD_ROLLOUT_", extra="forbid")

    port: int = Field(default=8200, ge=0, le=65535, description="TCP port to bind.")
    dtype: Dtype = Field(
        default="float32",
        description="Weights dtype. float32 makes served logprobs match the trainer's fp32 "
        "forward pass to ~1e-5; bfloat16 halves memory at ~1e-2 logprob noise.",
    )
    max_sequences_per_request: int = Field(
        default=4096, ge=1, description="Most prompts x n one request may ask for (413 past it)."
    )
    max_queue_tokens: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Admission bound: tokens of work admitted (waiting or generating), a "
        "request counting its prompt tokens plus n x its completion budget. Past it requests "
        "get 429 with Retry-After; a request that alone exceeds it gets 413.",
    )
    max_weights_bytes: int = Field(
        default=64 * 1024**3,
        ge=1024,
        description="Largest weight upload accepted (413); uploads are also refused past the "
        "model's own size in float32.",
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
    weights_dir: Path | None = Field(
        default=None,
        description="The only folder file updates (`POST /v1/weights`) may read from: paths, "
        "symlinks included, must resolve inside it (403 otherwise). Default: none, file "
        "updates are refused; a run config sets it to <run folder>/weights, where the "
        "trainer's file push writes.",
    )
    nccl_weight_transfer: bool = Field(
        default=False,
        description="GPU servers: also accept device weight pushes (vLLM: its NCCL "
        "weight-transfer engine; transformers: CUDA IPC from a trainer on the same host).",
    )
    policy_version: int = Field(
        default=0,
        ge=0,
        le=INT64_MAX,
        description="Version of the weights the server starts with (e.g. the step of the "
        "checkpoint it loads); every accepted update must carry a larger one. Restarting "
        "with it is how a server's version is reset.",
    )


class TeacherServerConfig(ServerConfig):
    """The teacher's scoring server: batched token logprobs, bounded admission, a cache."""

    model_config = SettingsConfigDict(env_prefix="RLAD_TEACHER_", extra="forbid")

    port: int = Field(default=8100, ge=0, le=65535, description="TCP port to bind.")
    dtype: Dtype = Field(
        default="auto",
        description="Weights and activations dtype. `auto`: the hf backend keeps the "
        "checkpoint's dtype; vLLM keeps it too, except a float32 checkpoint, which it serves "
        "in half precision (bfloat16 on x86 CPUs and bf16-capable GPUs). `GET /v1/info` "
        "reports the dtype in use. Logprobs are always returned in float32.",
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
        description="Admission bound: work waiting or being scored, in tokens as the engine "
        "runs them (padding included) plus one per top-k entry returned. Past it requests get "
        "429 with Retry-After, so memory stays bounded under any load; a request that alone "
        "exceeds it gets 413.",
    )
    max_request_tokens: int = Field(
        default=131072, ge=1, description="Most tokens one request may carry (413 past it)."
    )
    max_top_k: int = Field(default=64, ge=0, le=64, description="Largest `top_k` accepted.")
    length_bucket: int = Field(
        default=64,
        ge=1,
        description="HF backend: sequences are padded up to a multiple of this (shorter ones "
        "to a power of two), and only sequences of the same padded length share a forward "
        "pass, so little compute goes to padding.",
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
    enforce_eager: bool = Field(
        default=False,
        description="vLLM backend: skip graph compilation (faster start-up, e.g. on CPU).",
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
