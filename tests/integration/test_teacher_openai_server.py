"""A real `vllm serve` (CPU build, float32) as a teacher through `TeacherClient`
(`openai+http://…/v1`): the same logprobs and top-k as an rlad teacher server on the same
model, what it publishes for the tokenizer check, and its refusals classified as the
client classifies an rlad teacher's. One `vllm serve` per module (~40 s to start on CPU);
the rlad teacher is the transformers backend in a thread, so that only one vLLM engine runs
at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.clients.teacher import TeacherClient, TeacherRequestError, TeacherUnavailable
from services.common.protocol import ScoreResponse, ScoreSequence, ServerInfo
from services.common.tokenizer_check import check_compatible
from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import (
    ThreadedServer,
    assert_logprobs_close,
    random_sequences,
    start_vllm_serve,
)

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def vllm_serve(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_vllm_serve(
        tiny_teacher,
        tmp_path_factory.mktemp("vllm-serve-logs"),
        *("--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"),
    )
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def rlad_teacher(tiny_teacher: Path) -> Iterator[str]:
    config = TeacherServerConfig(model=str(tiny_teacher), backend="hf", dtype="float32")
    with ThreadedServer(config, HFTeacherEngine(config)) as server:
        yield server.url


def _client_call(url: str, call: str, sequences: list[ScoreSequence], top_k: int = 0) -> Any:
    async def go() -> ScoreResponse | ServerInfo:
        async with TeacherClient(
            [url], deadline_s=60, health_interval_s=0, max_batch_sequences=4
        ) as client:
            if call == "info":
                return await client.info()
            return await client.score(sequences, top_k=top_k)

    return asyncio.run(go())


def test_vllm_serve_scores_as_the_rlad_teacher_does(vllm_serve: str, rlad_teacher: str) -> None:
    # random ids cover the whole embedding (0..127); chunks of 4 sequences per request
    sequences = random_sequences(12, seed=800, max_len=150)
    from_vllm = _client_call(vllm_serve, "score", sequences, top_k=4)
    from_rlad = _client_call(rlad_teacher, "score", sequences, top_k=4)
    assert len(from_vllm.scores) == len(sequences)
    for a, b in zip(from_vllm.scores, from_rlad.scores, strict=True):
        assert_logprobs_close(a.logprobs, b.logprobs)
        assert a.top_k_ids == b.top_k_ids
        for row_a, row_b in zip(a.top_k_logprobs, b.top_k_logprobs, strict=True):
            assert_logprobs_close(row_a, row_b)
    without_top_k = _client_call(vllm_serve, "score", sequences)
    for a, b in zip(without_top_k.scores, from_rlad.scores, strict=True):
        assert a.top_k_ids is None
        assert_logprobs_close(a.logprobs, b.logprobs)


def test_what_vllm_serve_publishes_passes_the_tokenizer_check(
    vllm_serve: str, rlad_teacher: str
) -> None:
    info = _client_call(vllm_serve, "info", [])
    rlad_info = _client_call(rlad_teacher, "info", [])
    assert info.backend == "openai" and info.dtype is None
    assert info.max_model_len == MAX_MODEL_LEN - 1  # a position for the generated token
    assert info.tokenizer_fingerprint is None
    # vLLM's /tokenize splits the probe text as our servers' tokenizer does
    assert info.tokenizer_probe is not None and info.tokenizer_probe == rlad_info.tokenizer_probe
    assert check_compatible(rlad_info, info) is None
    scored = _client_call(vllm_serve, "score", random_sequences(1, seed=801))
    assert scored.revision == info.revision == info.model  # the served model's name


def test_refusals_are_classified_as_for_an_rlad_teacher(vllm_serve: str) -> None:
    longest = ScoreSequence(token_ids=[5] * (MAX_MODEL_LEN - 1), start=1)
    assert len(_client_call(vllm_serve, "score", [longest]).scores[0].logprobs) == 510
    for bad in ([3, 128], [5] * MAX_MODEL_LEN):  # out of the vocabulary; no room to generate
        with pytest.raises(TeacherRequestError) as error:
            _client_call(vllm_serve, "score", [ScoreSequence(token_ids=bad)])
        assert error.value.status == 400
    # over vLLM's --max-logprobs (20): no input would do, so no input is blamed
    with pytest.raises(TeacherUnavailable, match="--max-logprobs at least the scorer's top_k"):
        _client_call(vllm_serve, "score", random_sequences(1, seed=802), top_k=30)
