"""The pipeline's workers and their queue: the `rollout:`, `scorer:` and `queue:` blocks of
a run config (`rlad rollout-worker`, `rlad scorer`, the Redis streams between them), and
how a teacher URL names the API it speaks (`parse_teacher_url`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field

from services.common.protocol import MAX_TOP_K
from services.config.base import StrictModel

# A teacher URL names the API the scorer speaks to it: a plain `http(s)://` URL is an rlad
# teacher server (`POST /v1/score`); `openai+http(s)://host:port/v1` an OpenAI-compatible
# server such as `vllm serve`, read through `POST /v1/completions` with vLLM's
# `prompt_logprobs` (services/clients/openai_teacher.py).
TeacherApiKind = Literal["rlad", "openai"]
OPENAI_PREFIX = "openai+"
TEACHER_URL_FORMS = "http(s)://host:port (an rlad teacher) or openai+http(s)://host:port/v1"


def parse_teacher_url(url: str) -> tuple[TeacherApiKind, str]:
    """The API a teacher URL names and the server's root URL, where its API paths start:
    `openai+http://h:8000/v1` -> ("openai", "http://h:8000"); `http://h:8100` -> ("rlad",
    "http://h:8100"). Raises `ValueError` naming the accepted forms."""
    url = url.strip().rstrip("/")
    kind: TeacherApiKind = "rlad"
    if url.startswith(OPENAI_PREFIX):
        kind, url = "openai", url.removeprefix(OPENAI_PREFIX).removesuffix("/v1")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise ValueError(f"teacher URL {url!r} is neither {TEACHER_URL_FORMS}")
    return kind, url


class RolloutWorkerConfig(StrictModel):
    group_size: int = Field(default=8, ge=2, description="Completions per prompt (G).")
    prompts_per_request: int = Field(default=4, ge=1, description="Prompts per /v1/generate.")
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Sampling temperature; the trainer takes its logprobs at the same one.",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=160, ge=1, description="Completion length limit.")
    seed: int = Field(default=0, description="Orders the prompts and seeds the sampling.")
    synchronous: bool = Field(
        default=False,
        description="Strictly on-policy: after one trainer batch of groups, wait until the "
        "trainer has pushed the next version (no overlap of generation and training).",
    )


class ScorerConfig(StrictModel):
    mode: Literal["teacher", "passthrough"] = Field(
        default="teacher", description="`passthrough` skips the teacher (plain GRPO)."
    )
    batch_groups: int = Field(default=4, ge=1, description="Groups scored per teacher call.")
    top_k: int = Field(
        default=0,
        ge=0,
        le=MAX_TOP_K,
        description="Also store the teacher's k most likely ids and their logprobs at every "
        "completion token (6 bytes per token and k on the queue), which KDRL's "
        "kd_estimator topk needs; at most the teacher server's max_top_k. 0: none.",
    )
    max_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Batches of batch_groups a scorer keeps at the teacher at once: it takes "
        "more groups while earlier batches are being scored, so the teacher's latency is "
        "hidden. Each batch is forwarded and acknowledged on its own as it finishes; the "
        "groups held count toward queue.max_backlog like any other.",
    )
    deadline_s: float = Field(default=120.0, gt=0.0, description="Per-call teacher deadline.")
    skip_zero_variance: bool = Field(
        default=True,
        description="Forward a group whose rewards are all equal unscored, without a teacher "
        "call: its advantages are 0, so TRRD and GRPO take no gradient from it (counted as "
        "skipped_zero_variance). Always off for kdrl, whose KD term needs the teacher on "
        "every group.",
    )
    on_teacher_down: Literal["wait", "grpo"] = Field(
        default="wait",
        description="When no teacher answers: `wait` keeps the groups pending until one does; "
        "`grpo`, after degrade_after_s, forwards them unscored and marked degraded (trained "
        "as plain GRPO, counted as degraded_groups) and scores again as soon as a teacher "
        "answers.",
    )
    degrade_after_s: float = Field(
        default=120.0,
        gt=0.0,
        description="on_teacher_down grpo: how long no teacher may answer before groups go "
        "on unscored.",
    )


class QueueConfig(StrictModel):
    retired: ClassVar[Mapping[str, str]] = {
        "redis_url": "{path} is gone: give each process --redis-url or REDIS_URL "
        "(`rlad up` starts an embedded Redis without one)",
    }

    max_backlog: int = Field(
        default=64,
        ge=1,
        description="Producers wait while more groups than this await a scorer or the trainer.",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="A message delivered more often goes to the dead letters."
    )
    claim_idle_ms: int = Field(
        default=30_000, ge=100, description="Pending this long, a message is reclaimed."
    )
    redis_outage_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a process rides out an unreachable Redis (retrying each call "
        "with backoff) before it gives up and exits.",
    )
