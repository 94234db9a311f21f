"""`OpenAiApi`: an OpenAI-compatible server (`vllm serve`) as a teacher, for `TeacherClient`.

A teacher URL written `openai+http://host:8000/v1` is scored through vLLM's completions
API: the sequences go as token-id prompts in one `POST /v1/completions` with `max_tokens:
1` and vLLM's `prompt_logprobs` extension (`top_k`, or 0 for the sequence's own tokens
only), and each choice's `prompt_logprobs` (one `{token id: {logprob, rank, decoded_token}}`
per prompt position, `null` for the first) gives the logprob of each scored token and,
ranked, its top-k. The one generated token is discarded; it is why a sequence can be at
most `max_model_len - 1` tokens long here.

What the server publishes (`GET /v1/models`: the served name and `max_model_len`; `POST
/tokenize`: how it splits `PROBE_TEXT`) becomes its `ServerInfo`. It publishes no weight
hash, vocabulary or dtype: the revision is the served model name (serve new weights under
a new `--served-model-name`), the tokenizer check compares probes
(services/common/tokenizer_check.py), and the precision check cannot see the dtype (serve
with `--dtype float32`).

vLLM answers every invalid input with 400, as it does a request it cannot serve at all
(`prompt_logprobs` over its `--max-logprobs`): only the 400s whose message blames the
sequences (`INPUT_FAULTS`) count as input faults, so that a deployment fault never
dead-letters groups.

SGLang differs: its OpenAI routes do not take vLLM's `prompt_logprobs` extension; its
native `POST /generate` takes the token ids as `input_ids` with `return_logprob: true`,
`logprob_start_len` (the first position to score, so the prompt's part is not sent back),
`top_logprobs_num` and `sampling_params: {max_new_tokens: 0}` (no token to generate), and
answers per position in `meta_info.input_token_logprobs` (`[logprob, id, text]`) and
`meta_info.input_top_logprobs`. Another `TeacherApi` beside this one would speak it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.clients.teacher_api import SAME_KEY, ApiCall, HttpCall, TeacherApi
from services.common import wire
from services.common.protocol import (
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
    ServerInfo,
)
from services.common.tokenizer_check import PROBE_TEXT, probe_digest

JSON_HEADERS = {"content-type": wire.JSON, "accept": wire.JSON}
# vLLM 0.32's messages for a 400 that blames the prompt: an id outside the vocabulary, a
# prompt longer than the context (or filling it, leaving no room for the one generated
# token), an empty prompt, a negative id (a validation error on `prompt`).
INPUT_FAULTS = (
    "is out of vocabulary",
    "maximum context length",
    "max_tokens must be at least 1",
    "prompt cannot be empty",
    "'loc': 'body.prompt",
)


# ------------------------------------------------------------ vLLM's wire shapes (the part used)


class _VllmModel(BaseModel):
    """vLLM's answers carry more fields than these; they are ignored."""

    model_config = ConfigDict(extra="ignore")


class CompletionsRequest(BaseModel):
    prompt: list[list[int]] = Field(description="One token-id prompt per sequence.")
    max_tokens: Literal[1] = Field(default=1, description="vLLM generates at least one token.")
    prompt_logprobs: int = Field(ge=0, description="Top-k per position; 0: the token's own only.")


class PromptLogprob(_VllmModel):
    logprob: float
    rank: int | None = None  # 1 = most likely; vLLM always sets it


class CompletionChoice(_VllmModel):
    index: int
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionsAnswer(_VllmModel):
    model: str
    choices: list[CompletionChoice]


class ModelCard(_VllmModel):
    id: str
    max_model_len: int | None = None


class ModelList(_VllmModel):
    data: list[ModelCard] = Field(min_length=1)


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = False
    return_token_strs: bool = True


class TokenizeAnswer(_VllmModel):
    tokens: list[int]
    token_strs: list[str] | None = None


# ------------------------------------------------------------ the API


class OpenAiApi(TeacherApi):
    kind = "openai"
    refusal_hints: ClassVar[Mapping[int, str]] = {
        400: "the server refused the request itself: if it names prompt_logprobs, serve it "
        "with --max-logprobs at least the scorer's top_k",
        401: SAME_KEY + " (vllm serve --api-key)",
        403: SAME_KEY + " (vllm serve --api-key)",
        404: "no OpenAI completions API with one served model at this URL: write the "
        "server's base URL as openai+http://host:port/v1 and check that it runs vllm serve",
        405: "no OpenAI completions API at this URL: write it as openai+http://host:port/v1",
        415: "the server does not take JSON completions requests: is it an OpenAI-compatible "
        "server (vllm serve)?",
    }
    invalid_answer_hint = (
        "check that the URL serves vLLM's OpenAI-compatible API (vllm serve), which answers "
        "prompt_logprobs for token-id prompts"
    )

    def score(self, request: ScoreRequest) -> ApiCall[ScoreResponse]:
        body = CompletionsRequest(
            prompt=[seq.token_ids for seq in request.sequences], prompt_logprobs=request.top_k
        )
        return ApiCall(
            HttpCall("POST", "/v1/completions", body.model_dump_json().encode(), JSON_HEADERS),
            "completions answer with prompt_logprobs",
            lambda response, _: scores_from_answer(
                CompletionsAnswer.model_validate_json(response.content),
                request.sequences,
                request.top_k,
            ),
        )

    def info(self) -> ApiCall[ServerInfo]:
        probe = TokenizeRequest(prompt=PROBE_TEXT).model_dump_json().encode()
        return ApiCall(
            HttpCall("GET", "/v1/models", None, JSON_HEADERS),
            "model list (GET /v1/models)",
            server_info,
            extras=(HttpCall("POST", "/tokenize", probe, JSON_HEADERS),),
        )

    def input_fault(self, response: httpx.Response) -> bool:
        if response.status_code == 400:
            message = self.error_message(response)
            return any(fault in message for fault in INPUT_FAULTS)
        return response.status_code in (413, 422)

    def error_message(self, response: httpx.Response) -> str:
        """vLLM's `{"error": {"message": ...}}`, else the start of the body."""
        try:
            error = response.json()["error"]
            return str(error["message"])[:500]
        except (ValueError, KeyError, TypeError):
            return super().error_message(response)


def scores_from_answer(
    answer: CompletionsAnswer, sequences: list[ScoreSequence], top_k: int
) -> ScoreResponse:
    """The logprobs of tokens `start..` of each sequence, and their top-k ranked, read from
    the choices' `prompt_logprobs`. Raises `ValueError` on an answer that does not hold
    them for exactly these sequences."""
    choices = {choice.index: choice for choice in answer.choices}
    if sorted(choices) != list(range(len(sequences))):
        raise ValueError(
            f"choices are numbered {sorted(choices)[:8]} for {len(sequences)} prompts "
            f"(0..{len(sequences) - 1} expected)"
        )
    scores = []
    for index, seq in enumerate(sequences):
        rows = choices[index].prompt_logprobs
        if rows is None or len(rows) != len(seq.token_ids):
            got = "none" if rows is None else len(rows)
            raise ValueError(
                f"choices[{index}].prompt_logprobs has {got} positions for a prompt of "
                f"{len(seq.token_ids)} tokens (was prompt_logprobs honoured?)"
            )
        scores.append(_sequence_scores(rows, seq, top_k, index))
    return ScoreResponse(model=answer.model, revision=answer.model, scores=scores)


def _sequence_scores(
    rows: list[dict[int, PromptLogprob] | None], seq: ScoreSequence, top_k: int, index: int
) -> SequenceScores:
    logprobs: list[float] = []
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    for position in range(seq.start, len(seq.token_ids)):
        row, token = rows[position], seq.token_ids[position]
        where = f"choices[{index}].prompt_logprobs[{position}]"
        if row is None or token not in row:
            raise ValueError(f"{where} lacks the prompt's own token {token}")
        logprobs.append(row[token].logprob)
        if top_k:
            ranked = _top_k(row, token, top_k, where)
            top_ids.append([token_id for token_id, _ in ranked])
            top_logprobs.append([entry.logprob for _, entry in ranked])
    if not top_k:
        return SequenceScores(logprobs=logprobs)
    return SequenceScores(logprobs=logprobs, top_k_ids=top_ids, top_k_logprobs=top_logprobs)


def _top_k(
    row: dict[int, PromptLogprob], token: int, top_k: int, where: str
) -> list[tuple[int, PromptLogprob]]:
    """vLLM answers the top k and the prompt's own token: k entries when that token is
    among them, k + 1 when it is not (it is then left out; so it is when it ties with the
    k-th, the one case where its rank may be k or less with k + 1 entries)."""
    if len(row) not in (top_k, top_k + 1):
        raise ValueError(f"{where} has {len(row)} entries for prompt_logprobs={top_k}")
    entries = [(t, e) for t, e in row.items() if len(row) == top_k or t != token]
    if any(entry.rank is None for _, entry in entries):
        raise ValueError(f"{where} has entries without a rank")
    return sorted(entries, key=lambda item: (item[1].rank, -item[1].logprob))


def server_info(models: httpx.Response, extras: list[httpx.Response | None]) -> ServerInfo:
    """`ServerInfo` from `GET /v1/models` and, when it answered, `POST /tokenize`."""
    card = ModelList.model_validate_json(models.content).data[0]  # what a request gets
    if card.max_model_len is None:
        raise ValueError("data[0] names no max_model_len")
    return ServerInfo(
        role="teacher",
        model=card.id,
        revision=card.id,
        backend="openai",
        vocab_size=None,
        tokenizer_fingerprint=None,
        tokenizer_probe=_probe(extras[0]),
        max_model_len=card.max_model_len - 1,  # one position for the generated token
        dtype=None,
    )


def _probe(tokenized: httpx.Response | None) -> str | None:
    """The probe hash from `/tokenize`'s answer; None where the server has no such route."""
    if tokenized is None or tokenized.status_code != 200:
        return None
    try:
        answer = TokenizeAnswer.model_validate_json(tokenized.content)
    except ValidationError:
        return None
    if answer.token_strs is None or len(answer.token_strs) != len(answer.tokens):
        return None
    return probe_digest(answer.tokens, answer.token_strs)
