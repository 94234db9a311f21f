"""Wire schemas shared by every server, client and worker (docs/design.md#wire-contracts).

Token ids are the truth everywhere; text is only for humans. Every request and response
crosses the wire as JSON or as the compact msgpack body of `services.common.wire`, and is
validated by these models on both ends — nothing builds or reads a raw dict. Requests are
validated strictly (`RequestModel`): `true`, `"5"` and `5.0` are not token ids, and
NaN/infinity are no numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "abort"]

# Versions and seeds must fit 64 bits: msgpack (queue messages) and torch generators
# hold no more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Below this, logits divided by the temperature overflow; vLLM raises it to this too.
MIN_TEMPERATURE = 0.01
# A logprob is at most 0; float32 rounding of a near-certain token may land just above it.
LOGPROB_TOLERANCE = 1e-3
# The most alternatives a teacher returns per position (`ScoreRequest.top_k`).
MAX_TOP_K = 64
# The error `type` with which a teacher server refuses a top_k over its own max_top_k: the
# request is valid, the deployment cannot serve it, so clients must not blame (and
# dead-letter) the sequences.
TOP_K_OVER_LIMIT = "top_k_over_limit"


class WireModel(BaseModel):
    """Base of every schema: unknown fields are rejected so typos fail loudly."""

    model_config = ConfigDict(extra="forbid")


class RequestModel(WireModel):
    """Base of what a server reads from a client: no coercion (a bool, a numeric string or
    a float is not an int) and no NaN or infinity, so what is validated is what was sent."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- errors and info


class ErrorBody(WireModel):
    type: str = Field(
        description="Machine-readable kind, e.g. `invalid_request`, `overloaded`, "
        "`top_k_over_limit`: what clients act on (the message is for people)."
    )
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
    backend: Literal["vllm", "hf", "openai"] = Field(
        description="Inference engine: vLLM or transformers; `openai` for an OpenAI-compatible "
        "server (`vllm serve`) that the teacher client reads through its completions API."
    )
    vocab_size: int | None = Field(
        description="Rows of the model's embedding matrix; None where the server does not "
        "publish it (an OpenAI-compatible teacher)."
    )
    tokenizer_fingerprint: str | None = Field(
        description="Hash of the whole vocabulary (see `services.common.tokenizer_check`); None "
        "where the server does not publish its vocabulary (an OpenAI-compatible teacher)."
    )
    tokenizer_probe: str | None = Field(
        default=None,
        description="Hash of how the tokenizer splits a fixed probe text "
        "(`services.common.tokenizer_check.PROBE_TEXT`): what the tokenizer check compares "
        "when one side has no `tokenizer_fingerprint`.",
    )
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
    top_k: int = Field(
        default=0, ge=0, le=MAX_TOP_K, description="Also return the k most likely ids."
    )


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


class TeacherTopK(WireModel):
    """The teacher's k most likely ids and their logprobs at each completion token, as two
    packed arrays of `[n_tokens, k]`: 6 bytes per entry, so the top-32 of a group of
    8 × 160 tokens adds 246 kB to its 17 kB, against 336 kB as the teacher's nested rows
    through the same codec (`bench/topk_bytes.py`).

    `ids` are little-endian int32 (any vocabulary up to 2^31). `logprobs` are little-endian
    float16: 2 bytes a value instead of float32's 4, with 11 significant bits, i.e. a
    relative error of at most 2^-11 ≈ 5e-4 of the logprob (0.0015 nats at −3, where
    p_T = 0.05 is off by 0.15 %) and a range down to −65504, below any teacher's
    top-k logprob. That is finer than the teacher's own rounding when it computes in
    bfloat16 (8 significant bits), and the KD term weights each entry by p_T, so an
    error there moves the loss by less. Rounding is monotone: rows sorted best first
    stay sorted (ties may appear)."""

    # Bytes are base64 in JSON (`rlad dead list`, logs); msgpack carries them raw.
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    k: int = Field(ge=1, le=MAX_TOP_K, description="Alternatives per position.")
    ids: bytes = Field(description="[n_tokens, k] int32, little-endian, row by row, best first.")
    logprobs: bytes = Field(description="[n_tokens, k] float16, little-endian: logprobs of `ids`.")

    @classmethod
    def from_rows(cls, ids: list[list[int]], logprobs: list[list[float]], k: int) -> TeacherTopK:
        """Packs the teacher's nested rows (`SequenceScores.top_k_ids/top_k_logprobs`);
        raises `ValueError` when they are not `[n, k]` valid top-k rows."""
        widths = {len(row) for row in ids} | {len(row) for row in logprobs}
        if len(ids) != len(logprobs) or widths - {k}:
            raise ValueError(
                f"top-k rows are not [{len(ids)}, {k}] ids and logprobs: the teacher must "
                f"answer with top_k={k}"
            )
        id_rows = np.asarray(ids, dtype=np.int64).reshape(len(ids), k)
        if id_rows.size and (id_rows.min() < 0 or id_rows.max() > np.iinfo(np.int32).max):
            raise ValueError("top-k ids must be token ids (0 .. 2^31 - 1)")
        # Below float16's range is p_T = 0 anyway (exp(−65504)); the floor keeps it finite.
        logprob_rows = np.asarray(logprobs, dtype=np.float64).reshape(len(ids), k)
        logprob_rows = logprob_rows.clip(min=float(np.finfo(np.float16).min))
        return cls(
            k=k,
            ids=id_rows.astype("<i4").tobytes(),
            logprobs=logprob_rows.astype("<f2").tobytes(),
        )

    @property
    def n_tokens(self) -> int:
        return len(self.ids) // (4 * self.k)

    def id_array(self) -> np.ndarray:  # [n_tokens, k] int32
        return np.frombuffer(self.ids, dtype="<i4").reshape(-1, self.k)

    def logprob_array(self) -> np.ndarray:  # [n_tokens, k] float32 (exact from float16)
        return np.frombuffer(self.logprobs, dtype="<f2").astype(np.float32).reshape(-1, self.k)

    @model_validator(mode="after")
    def _top_k_rows(self) -> TeacherTopK:
        if len(self.ids) % (4 * self.k) or len(self.logprobs) != len(self.ids) // 2:
            raise ValueError(
                f"{len(self.ids)} bytes of ids and {len(self.logprobs)} bytes of logprobs are "
                f"not [n_tokens, {self.k}] int32 and float16 arrays"
            )
        ids, logprobs = self.id_array(), self.logprob_array()
        if ids.size and ids.min() < 0:
            raise ValueError(f"top-k id {int(ids.min())} is negative: send token ids")
        if not np.isfinite(logprobs).all():
            raise ValueError("top-k logprobs must be finite numbers")
        if logprobs.size and logprobs.max() > LOGPROB_TOLERANCE:
            raise ValueError(
                f"top-k logprob {float(logprobs.max()):g} is above 0: send log-probabilities"
            )
        rising = (logprobs[:, 1:] > logprobs[:, :-1]).any(axis=1)  # [n_tokens]
        if rising.any():
            raise ValueError(f"top-k row {int(rising.argmax())} is not sorted best first")
        return self


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
    teacher_top_k: TeacherTopK | None = Field(
        default=None,
        description="The teacher's top-k ids and logprobs at each token, when the scorer "
        "asks for them (scorer.top_k > 0).",
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
        top_k = self.teacher_top_k
        if top_k is not None and top_k.n_tokens != tokens:
            raise ValueError(
                f"teacher_top_k has {top_k.n_tokens} rows for {tokens} completion tokens: "
                "its producer must send exactly one top-k row per token"
            )
        return self


class RolloutGroup(WireModel):
    """One queue message: G completions of one prompt, as produced and then as scored."""

    group_id: str
    prompt_id: str
    task: str
    subset: str | None = Field(
        default=None, description="The problem's subset (e.g. PPL3): teacher pools route by it."
    )
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
    teacher_pool: str | None = Field(
        default=None,
        description="The teacher pool that scored the group (services/config/teachers.py); "
        "the trainer pins one teacher revision per pool.",
    )
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
