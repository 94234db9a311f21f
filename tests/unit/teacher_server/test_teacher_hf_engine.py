"""The transformers engine against a naive forward pass, its batching plan, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.bootstrap.tiny_models import build_tokenizer, save_tiny_model
from services.common.http_server import ApiError
from services.common.model_files import weights_revision
from services.common.protocol import ScoreRequest, ScoreSequence
from services.common.tokenizer_check import tokenizer_fingerprint
from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine, plan_micro_batches
from teacher_server.teacher_engine import validate_request
from tests.teacher_support import Reference, assert_logprobs_close, random_sequences


def test_logprobs_equal_a_plain_forward_pass(
    hf_engine: HFTeacherEngine, reference: Reference
) -> None:
    # lengths 4..200 span many 16-token buckets and several 1024-token micro-batches
    sequences = random_sequences(10, seed=0, max_len=200)
    response = hf_engine.score(ScoreRequest(sequences=sequences))
    assert response.revision == hf_engine.info().revision
    for seq, scores in zip(sequences, response.scores, strict=True):
        expected = reference.logprobs(seq)
        assert len(scores.logprobs) == len(seq.token_ids) - seq.start
        assert scores.top_k_ids is None
        assert_logprobs_close(scores.logprobs, expected)


def test_top_k_are_the_most_likely_ids_with_their_logprobs(
    hf_engine: HFTeacherEngine, reference: Reference
) -> None:
    sequences = random_sequences(5, seed=1)
    response = hf_engine.score(ScoreRequest(sequences=sequences, top_k=4))
    for seq, scores in zip(sequences, response.scores, strict=True):
        rows = reference.log_softmax(seq)
        values, ids = rows.topk(4, dim=-1)
        assert scores.top_k_ids == ids.tolist()
        torch.testing.assert_close(
            torch.tensor(scores.top_k_logprobs, dtype=torch.float64), values, atol=1e-4, rtol=0
        )
        assert_logprobs_close(scores.logprobs, reference.logprobs(seq))


def test_bfloat16_engine_returns_float32_logprobs_close_to_fp32(
    hf_config: TeacherServerConfig, reference: Reference
) -> None:
    engine = HFTeacherEngine(hf_config.model_copy(update={"dtype": "bfloat16"}))
    assert engine.model.dtype == torch.bfloat16
    assert engine.info().dtype == "bfloat16"  # what /v1/info tells the scorer
    seq = random_sequences(1, seed=2, min_len=40)[0]
    (scores,) = engine.score(ScoreRequest(sequences=[seq])).scores
    diff = torch.tensor(scores.logprobs, dtype=torch.float64) - torch.tensor(
        reference.logprobs(seq)
    )
    assert diff.abs().max() < 0.1  # bf16 has ~3 significant digits


def test_auto_keeps_the_checkpoints_dtype_and_says_so(hf_config: TeacherServerConfig) -> None:
    engine = HFTeacherEngine(hf_config.model_copy(update={"dtype": "auto"}))
    assert engine.model.dtype == torch.float32  # the tiny checkpoints are saved in float32
    assert engine.info().dtype == "float32"


def test_micro_batch_plan_covers_every_sequence_within_budget() -> None:
    lengths = [5, 17, 16, 33, 2, 100, 18, 300]
    plan = list(plan_micro_batches(lengths, bucket=16, max_tokens=64, max_len=256))
    seen = sorted(i for indices, _ in plan for i in indices)
    assert seen == list(range(len(lengths)))
    for indices, padded in plan:
        assert all(lengths[i] <= padded for i in indices)
        assert len({-(-lengths[i] // 16) for i in indices}) == 1 or padded >= 256
        assert len(indices) * padded <= 64 or len(indices) == 1
    # Below one bucket, lengths pad to a power of two: 2 stays 2, 5 pads to 8; 16 fills a
    # bucket; 17 and 18 pad to 32
    assert ([4], 2) in plan and ([0], 8) in plan and ([2], 16) in plan
    assert ([1, 6], 32) in plan
    assert ([7], 300) in plan  # longer than max_len: alone, unpadded


def test_validation_names_the_offending_sequence_and_index(
    hf_engine: HFTeacherEngine, hf_config: TeacherServerConfig
) -> None:
    info = hf_engine.info()
    ok = ScoreSequence(token_ids=[1, 2, 3], start=1)

    def refusal(request: ScoreRequest) -> ApiError:
        with pytest.raises(ApiError) as caught:
            validate_request(request, info, hf_config)
        return caught.value

    err = refusal(ScoreRequest(sequences=[ok, ScoreSequence(token_ids=[1, 2, 128, 3])]))
    assert err.status == 422 and "sequences[1].token_ids[2] = 128" in err.message
    err = refusal(ScoreRequest(sequences=[ScoreSequence(token_ids=[4, -1])]))
    assert err.status == 422 and "sequences[0].token_ids[1] = -1" in err.message
    err = refusal(ScoreRequest(sequences=[ok, ok, ScoreSequence(token_ids=[1] * 257)]))
    assert err.status == 422 and "sequences[2] has 257 tokens" in err.message
    err = refusal(ScoreRequest(sequences=[ScoreSequence(token_ids=[1] * 200)] * 21))
    assert err.status == 413 and "4200 tokens" in err.message
    err = refusal(ScoreRequest(sequences=[ok], top_k=64).model_copy(update={"top_k": 65}))
    assert err.status == 422 and "top_k=65" in err.message


def test_info_describes_the_loaded_weights(hf_engine: HFTeacherEngine, tmp_path: Path) -> None:
    info = hf_engine.info()
    assert (info.role, info.backend, info.vocab_size, info.max_model_len) == (
        "teacher",
        "hf",
        128,
        256,
    )
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(build_tokenizer())
    assert info.revision == weights_revision(Path(info.model))
    other = save_tiny_model(tmp_path / "other", "teacher", seed=99)
    assert weights_revision(other) != info.revision
