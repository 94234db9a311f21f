"""The rollout engine interface, shared by the vLLM and transformers backends.

An engine is a plain Python object: the HTTP app is a thin layer over it, and evaluation
code uses it in-process. Its methods are coroutines; use one event loop for its lifetime.

    engine = load_engine(RolloutServerConfig(model="path/to/student", backend="vllm"))
    response = await engine.generate(GenerateRequest(prompts=[[5, 6, 7]]))
    engine.shutdown()

Sampling logprobs are the log-softmax of the logits actually sampled from: divided by the
temperature and with top-k/top-p filtering applied (vLLM `logprobs_mode=
"processed_logprobs"`; `output_scores` in transformers). With top-p 1 and top-k -1 they
equal `services.common.logprobs.sequence_logprobs(..., temperature)` of the completion.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from services.common.http_server import ApiError
from services.common.protocol import (
    GenerateRequest,
    GenerateResponse,
    SamplingParams,
    ServerInfo,
    WeightUpdateRequest,
    WeightUpdateResponse,
)


class RolloutEngine(Protocol):
    def info(self) -> ServerInfo:
        """Model, `policy_version`, weights revision, tokenizer fingerprint, max length."""
        ...

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Sample `n` completions per prompt; every token comes from `policy_version`."""
        ...

    async def update_weights_from_path(self, request: WeightUpdateRequest) -> WeightUpdateResponse:
        """Load safetensors from a shared volume; answers only once verified."""
        ...

    async def update_weights_from_upload(
        self, chunks: AsyncIterator[bytes], request: WeightUpdateRequest
    ) -> WeightUpdateResponse:
        """Load a safetensors file streamed as `chunks`; `request.sha256` names it
        `model.safetensors`. Answers only once verified."""
        ...

    def shutdown(self) -> None:
        """Stop the engine (and its child processes); remove staged weights."""
        ...


def resolve_prompts(request: GenerateRequest, tokenizer: Any) -> list[list[int]]:
    """The prompts as token ids; 422 for a text that encodes to no token (an empty string,
    or characters the tokenizer drops), which no model can continue."""
    if request.prompts is not None:
        return request.prompts
    assert request.prompt_texts is not None  # the schema guarantees one form
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in request.prompt_texts]
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ApiError(
            422,
            "invalid_request",
            f"prompt_texts[{empty[0]}] encodes to no tokens ({len(empty)} such prompts); "
            "send text the tokenizer knows, or token ids",
        )
    return prompts


def generation_cost(prompts: list[list[int]], budgets: list[int], n: int) -> int:
    """Tokens of work a request asks for: each prompt, and n completions up to its budget."""
    return sum(len(prompt) + n * budget for prompt, budget in zip(prompts, budgets, strict=True))


def completion_budgets(
    prompts: list[list[int]],
    sampling: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    max_sequences: int,
) -> list[int]:
    """Check a request against the model; per prompt, how many tokens it may generate.

    A completion stops at the context end: `min(max_tokens, max_model_len - len(prompt))`.
    """
    total = len(prompts) * sampling.n
    if total > max_sequences:
        raise ApiError(
            413,
            "too_large",
            f"{len(prompts)} prompts x n={sampling.n} = {total} sequences exceeds the limit of "
            f"{max_sequences} per request; split the batch",
        )
    if sampling.top_k > vocab_size:
        raise ApiError(
            422,
            "invalid_request",
            f"top_k={sampling.top_k} exceeds the vocabulary ({vocab_size}); -1 disables top-k",
        )
    bad_stop = [t for t in sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stop:
        raise ApiError(
            422,
            "invalid_request",
            f"stop_token_ids {bad_stop} are outside the vocab [0, {vocab_size})",
        )
    budgets = []
    for i, prompt in enumerate(prompts):
        if len(prompt) >= max_model_len:
            raise ApiError(
                422,
                "invalid_request",
                f"prompts[{i}] has {len(prompt)} tokens; the model accepts at most "
                f"{max_model_len - 1} so that one token can be generated",
            )
        outside = [t for t in prompt if not 0 <= t < vocab_size]
        if outside:
            raise ApiError(
                422,
                "invalid_request",
                f"prompts[{i}] holds token ids {outside[:5]} outside the vocab [0, {vocab_size})",
            )
        budgets.append(min(sampling.max_tokens, max_model_len - len(prompt)))
    return budgets
