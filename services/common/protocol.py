"""Wire schemas shared by every server, client and worker (docs/design.md#wire-contracts).

Token ids are the truth everywhere; text is only for humans. Every request and response
crosses the wire as JSON or as the compact msgpack body of `services.common.wire`, and is
validated by these models on both ends — nothing builds or reads a raw dict. Requests are
validated strictly (`RequestModel`): `true`, `"5"` and `5.0` are not token ids, and
NaN/infinity are no numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "abort"]

# Versions and seeds must fit 64 bits: msgpack (queue messages) and torch generators
# hold no more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Below this, logits divided by the temperature overflow; vLLM raises it to this too.
MIN_TEMPERATURE = 0.01
# A logprob is at most 0; float32 rounding of a near-certain token may land just above it.
LOGPROB_TOLERANCE = 1e-3


class WireModel(BaseModel):
    """Base of every schema: unknown fields are rejected so typos fail loudly."""

    model_config = ConfigDict(extra="forbid")


class RequestModel(WireModel):
    """Base of what a server reads from a client: no coercion (a bool, a numeric string or
    a float is not an int) and no NaN or infinity, so what is validated is what was sent."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- errors and info


class ErrorBody(WireModel):
    type: str = Field(description="Machine-readable kind, e.g. `invalid_request`, `overloaded`.")
    message: str = Field(description="What went wrong and how to fix it.")
    detail: list[dict[str, object]] | None = Field(
        default=None, description="Per-field validation problems, when there are any."
    )


class ErrorResponse(WireModel):
    """The one error shape every server answers with, whatever the status code."""

    error: ErrorBody = Field(description="What went wrong.")


class ServerInfo(WireModel):
    role: Literal["teacher", "rollout"] = Field(description="Which kind of server this is.")
    model: str = Field(description="Model id or path the server was started with.")
    revision: str = Field(description="Hash of the loaded weights (changes on every update).")
    backend: Literal["vllm", "hf"] = Field(description="Inference engine: vLLM or transformers.")
    vocab_size: int = Field(description="Rows of the model's embedding matrix.")
    tokenizer_fingerprint: str = Field(description="See `services.common.tokenizer_check`.")
    max_model_len: int = Field(description="Longest sequence (prompt + completion) accepted.")
    dtype: str | None = Field(
        default=None,
        description="Teacher servers: the dtype the engine really computes in (`float32`, "
        "`bfloat16`, `float16`), whatever `--dtype` asked for; `auto` resolves per backend.",
    )
    policy_version: int | None = Field(
        default=None, description="Rollout servers: version of the weights now serving."
    )


# ---------------------------------------------------------------- teacher scoring


class ScoreSequence(RequestModel):
    token_ids: list[int] = Field(
        min_length=2, description="Full sequence (prompt + completion) as token ids."
    )
    start: int = Field(
        default=1,
        ge=1,
        description="Index of the first token to score; tokens `start..len-1` are scored, "
        "each conditioned on all tokens before it.",
    )

    @model_validator(mode="after")
    def _start_inside(self) -> ScoreSequence:
        if not self.token_ids:
            raise ValueError("token_ids is empty: send at least two tokens")
        if self.start >= len(self.token_ids):
            raise ValueError(
                f"start={self.start} is out of range for {len(self.token_ids)} tokens "
                f"(must be 1..{len(self.token_ids) - 1})"
            )
        return self


class ScoreRequest(RequestModel):
    sequences: list[ScoreSequence] = Field(min_length=1, description="Sequences to score.")
    top_k: int = Field(default=0, ge=0, le=64, description="Also return the k most likely ids.")


class SequenceScores(WireModel):
    logprobs: list[float] = Field(description="Logprob of each scored token, `start..len-1`.")
    top_k_ids: list[list[int]] | None = Field(
        default=None, description="[n_scored][k] most likely ids per scored position, best first."
    )
    top_k_logprobs: list[list[float]] | None = Field(
        default=None, description="[n_scored][k] logprobs of `top_k_ids`."
    )


class ScoreResponse(WireModel):
    model: str = Field(description="Teacher model id or path.")
    revision: str = Field(description="Hash of the teacher weights that computed the scores.")
    scores: list[SequenceScores] = Field(description="One entry per request sequence, in order.")


# ---------------------------------------------------------------- rollout generation


class SamplingParams(RequestModel):
    n: int = Field(default=1, ge=1, le=256, description="Completions per prompt (G).")
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description=f"0 samples greedily; otherwise at least {MIN_TEMPERATURE}.",
        json_schema_extra={"not": {"exclusiveMinimum": 0.0, "exclusiveMaximum": MIN_TEMPERATURE}},
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        default=-1, ge=-1, description="-1 disables top-k filtering; at most the vocab size."
    )
    max_tokens: int = Field(default=256, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = Field(
        default=None,
        ge=INT64_MIN,
        le=INT64_MAX,
        description="Same seed and weights: same samples.",
    )

    @model_validator(mode="after")
    def _temperature_usable(self) -> SamplingParams:
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {self.temperature:g} is below {MIN_TEMPERATURE}: the logits would "
                "overflow; send 0 for greedy sampling"
            )
        return self


class GenerateRequest(RequestModel):
    # What `_one_prompt_form` enforces, stated in the JSON schema too (clients, fuzzing).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["prompts"],
                    "properties": {
                        "prompts": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"minItems": 1, "items": {"minimum": 0}},
                        },
                        "prompt_texts": {"type": "null"},
                    },
                },
                {
                    "required": ["prompt_texts"],
                    "properties": {
                        "prompt_texts": {"type": "array", "minItems": 1},
                        "prompts": {"type": "null"},
                    },
                },
            ]
        }
    )

    prompts: list[list[int]] | None = Field(default=None, description="Prompts as token ids.")
    prompt_texts: list[str] | None = Field(default=None, description="Prompts as text.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerateRequest:
        if (self.prompts is None) == (self.prompt_texts is None):
            raise ValueError("give exactly one of `prompts` (token ids) or `prompt_texts`")
        given = self.prompts if self.prompts is not None else self.prompt_texts
        if not given:
            raise ValueError("no prompts given")
        if self.prompts is not None:
            for i, prompt in enumerate(self.prompts):
                if not prompt:
                    raise ValueError(f"prompts[{i}] is empty")
        return self


class Completion(WireModel):
    token_ids: list[int]
    logprobs: list[float] = Field(description="Sampling logprob of each generated token.")
    finish_reason: FinishReason
    text: str | None = None


class PromptCompletions(WireModel):
    prompt_token_ids: list[int]
    completions: list[Completion]


class GenerateResponse(WireModel):
    policy_version: int = Field(description="The weights version that produced every token.")
    results: list[PromptCompletions]


# ---------------------------------------------------------------- weight updates


class WeightProbe(RequestModel):
    """A fixed sequence and the logprobs the sender computed for it with the new weights."""

    token_ids: list[int] = Field(min_length=2)
    logprobs: list[float] = Field(description="Logprob of tokens 1..len-1 under the new weights.")
    atol: float = Field(default=1e-3, gt=0.0)

    @model_validator(mode="after")
    def _lengths(self) -> WeightProbe:
        if len(self.logprobs) != len(self.token_ids) - 1:
            raise ValueError("probe needs one logprob per token after the first")
        return self


class WeightUpdateRequest(RequestModel):
    """Load weights from a safetensors file or folder on a volume both sides can read."""

    version: int = Field(
        ge=0, le=INT64_MAX, description="Must be greater than the serving version."
    )
    path: str | None = Field(
        default=None,
        description="Shared-volume transport: a file or folder inside the server's weights_dir.",
    )
    sha256: dict[str, str] | None = Field(
        default=None, description="Per-file sha256 the server checks before loading."
    )
    probe: WeightProbe | None = None


class NcclInitRequest(RequestModel):
    """GPU rollout servers: join the trainer's NCCL group (vLLM's weight-transfer engine)."""

    init_info: dict[str, Any] = Field(
        description="vLLM `NCCLWeightTransferInitInfo` fields (master_address, master_port, "
        "rank_offset, world_size, packed ...), as vLLM's trainer engine sends them."
    )


class NcclStartRequest(RequestModel):
    version: int = Field(
        ge=0, le=INT64_MAX, description="Must be greater than the serving version."
    )


class NcclUpdateRequest(RequestModel):
    update_info: dict[str, Any] = Field(
        description="vLLM `NCCLWeightTransferUpdateInfo`: names, dtype_names, shapes."
    )


class NcclFinishRequest(RequestModel):
    probe: WeightProbe | None = None


class WeightUpdateResponse(WireModel):
    policy_version: int
    revision: str
    transport: Literal["file", "http", "nccl", "cuda_ipc"]
    bytes: int
    duration_s: float
    probe_max_abs_diff: float | None = None


# ---------------------------------------------------------------- queue messages


class CompletionRecord(WireModel):
    """One sampled completion. Its logprob rows hold one value per completion token, each a
    finite logprob, so that every consumer can line them up with the tokens: a row of
    another length would be broadcast or cut silently by the trainer's tensors."""

    # Checked on assignment too: the scorer fills `teacher_logprobs` in place, and a
    # teacher answer of the wrong length is refused there, before it is published.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    token_ids: list[Annotated[int, Field(ge=0)]]
    rollout_logprobs: list[float] = Field(description="Sampling logprob of each token.")
    reward: float
    finish_reason: FinishReason
    correct: bool | None = Field(default=None, description="Task verdict, for accuracy metrics.")
    teacher_logprobs: list[float] | None = Field(
        default=None, description="The teacher's logprob of each token, once scored."
    )

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> CompletionRecord:
        rows = {"rollout_logprobs": self.rollout_logprobs}
        if self.teacher_logprobs is not None:
            rows["teacher_logprobs"] = self.teacher_logprobs
        tokens = len(self.token_ids)
        for name, row in rows.items():
            if len(row) != tokens:
                raise ValueError(
                    f"{name} has {len(row)} values for {tokens} completion tokens: "
                    "its producer must send exactly one logprob per token"
                )
            above = [(i, v) for i, v in enumerate(row) if v > LOGPROB_TOLERANCE]
            if above:
                i, value = above[0]
                raise ValueError(
                    f"{name}[{i}] = {value:g} is not a logprob (above 0); "
                    f"{len(above)} such values: send log-probabilities, not probabilities"
                )
        return self


class RolloutGroup(WireModel):
    """One queue message: G completions of one prompt, as produced and then as scored."""

    group_id: str
    prompt_id: str
    task: str
    policy_version: int
    prompt_index: int | None = Field(
        default=None,
        ge=0,
        description="Position of the prompt in the run's seeded prompt stream (the shared "
        "prompt cursor): every position is generated by one rollout worker.",
    )
    prompt_token_ids: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    completions: list[CompletionRecord] = Field(min_length=1)
    teacher_revision: str | None = None
    degraded: bool = Field(
        default=False,
        description="Forwarded without teacher logprobs because no teacher answered for "
        "scorer.degrade_after_s (scorer.on_teacher_down: grpo): the trainer trains this "
        "group with alpha = 1 (plain GRPO) and no KD term.",
    )
    timestamps: dict[str, float] = Field(
        default_factory=dict, description="Unix time per stage: generated, scored, trained."
    )

    @property
    def rewards_all_equal(self) -> bool:
        """Every completion got the same reward: the group's advantages are all exactly 0
        (the test `trainer.advantages` makes), so TRRD and GRPO learn nothing from it."""
        return all(c.reward == self.completions[0].reward for c in self.completions)
