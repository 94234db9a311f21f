"""Staging and checking weight updates: the safetensors stream, schema checks, checksums,
tied heads, truncation, and the probe."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from rollout_server.staging import (
    TIED_FILE,
    UPLOAD_FILE,
    WeightSchema,
    receive_upload,
    verify_staged,
)
from services.common.http_server import ApiError
from services.common.logprobs import sequence_logprobs
from services.weights.probe import check_probe, make_probe, probe_token_ids
from services.weights.safetensors_io import encode_chunks, read_header

Perturb = Callable[..., PreTrainedModel]  # the `perturbed` fixture


def encoded(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(c) for c in encode_chunks(state)[1])


async def as_stream(data: bytes, chunk: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


@pytest.fixture(scope="module")
def schema(tied_student: Path) -> WeightSchema:
    return WeightSchema.from_model_dir(tied_student)


def stage(folder: Path, data: bytes, schema: WeightSchema, declared: str | None = None):
    _, digest = asyncio.run(
        receive_upload(as_stream(data), folder, schema, max_bytes=1 << 30, idle_timeout_s=5)
    )
    return verify_staged(folder, schema, {UPLOAD_FILE: digest}, {UPLOAD_FILE: declared or digest})


def test_stream_encoding_round_trips_through_safetensors(tmp_path: Path) -> None:
    state = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.ones(3, 2).t(),  # not contiguous
    }
    size, _ = encode_chunks(state)
    data = encoded(state)
    assert len(data) == size
    (tmp_path / "x.safetensors").write_bytes(data)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
    assert set(read_header(tmp_path / "x.safetensors")) == set(state)


def test_schema_of_a_tied_model_lists_the_head(tied_student: Path) -> None:
    schema = WeightSchema.from_model_dir(tied_student)
    assert schema.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert schema.shapes["lm_head.weight"] == (128, 128)


def test_a_good_update_stages_with_its_checksum(
    perturbed: Perturb, tied_student: Path, tmp_path: Path
) -> None:
    schema = WeightSchema.from_model_dir(tied_student)
    state = perturbed(tied_student, seed=1).state_dict()
    data = encoded(state)
    staged = stage(tmp_path, data, schema)
    assert staged.sha256 == {UPLOAD_FILE: hashlib.sha256(data).hexdigest()}
    assert staged.bytes == len(data)
    assert [p.name for p in staged.files()] == [UPLOAD_FILE]


def test_a_tied_model_without_head_gets_it_written(
    perturbed: Perturb, tied_student: Path, tmp_path: Path
) -> None:
    schema = WeightSchema.from_model_dir(tied_student)
    state = dict(perturbed(tied_student, seed=1).state_dict())
    embedding = state.pop("lm_head.weight")
    staged = stage(tmp_path, encoded(state), schema)
    head = load_file(str(staged.folder / TIED_FILE))["lm_head.weight"]
    assert torch.equal(head, embedding)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.pop("model.norm.weight"), "missing tensors ['model.norm.weight']"),
        (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensor 'extra'"),
        (
            lambda s: s.update({"model.norm.weight": torch.ones(64)}),
            "model.norm.weight: shape [64], expected [128]",
        ),
        (
            lambda s: s.update({"model.norm.weight": torch.ones(128, dtype=torch.int64)}),
            "model.norm.weight: dtype I64",
        ),
        (
            lambda s: s.update({"lm_head.weight": torch.zeros(128, 128)}),
            "tied model: lm_head.weight must equal model.embed_tokens.weight",
        ),
    ],
)
def test_updates_that_do_not_fit_the_model_are_refused_by_name(
    perturbed: Perturb, tied_student: Path, tmp_path: Path, change, reason: str
) -> None:
    schema = WeightSchema.from_model_dir(tied_student)
    state = dict(perturbed(tied_student, seed=1).state_dict())
    change(state)
    with pytest.raises(ApiError) as caught:
        stage(tmp_path, encoded(state), schema)
    assert caught.value.status == 422
    assert reason in caught.value.message


def test_a_corrupted_upload_fails_its_checksum(
    perturbed: Perturb, tied_student: Path, tmp_path: Path
) -> None:
    schema = WeightSchema.from_model_dir(tied_student)
    data = bytearray(encoded(perturbed(tied_student, seed=1).state_dict()))
    declared = hashlib.sha256(data).hexdigest()
    data[-10] ^= 0xFF  # one flipped bit pattern in the last tensor
    with pytest.raises(ApiError) as caught:
        stage(tmp_path, bytes(data), schema, declared=declared)
    assert (caught.value.status, caught.value.type) == (400, "checksum_mismatch")


def test_a_truncated_upload_is_refused(
    perturbed: Perturb, tied_student: Path, tmp_path: Path, schema: WeightSchema
) -> None:
    data = encoded(perturbed(tied_student, seed=1).state_dict())
    with pytest.raises(ApiError) as caught:
        asyncio.run(
            receive_upload(
                as_stream(data[:-100]), tmp_path, schema, max_bytes=1 << 30, idle_timeout_s=5
            )
        )
    assert (caught.value.status, caught.value.type) == (400, "truncated_upload")
    assert f"received {len(data) - 100} bytes" in caught.value.message


def receive(chunks: AsyncIterator[bytes], folder: Path, schema: WeightSchema, **limits):
    options = {"max_bytes": 1 << 30, "idle_timeout_s": 5.0} | limits
    return asyncio.run(receive_upload(chunks, folder, schema, **options))


def test_garbage_is_not_a_safetensors_upload(tmp_path: Path, schema: WeightSchema) -> None:
    with pytest.raises(ApiError) as caught:
        receive(as_stream(b"\xff" * 64), tmp_path, schema)
    assert (caught.value.status, caught.value.type) == (400, "malformed_weights")


def test_a_header_longer_than_the_model_needs_is_refused(
    tmp_path: Path, schema: WeightSchema
) -> None:
    declared = (schema.max_header_bytes + 1).to_bytes(8, "little")  # under the format's limit
    with pytest.raises(ApiError) as caught:
        receive(as_stream(declared + b" " * schema.max_header_bytes), tmp_path, schema)
    assert (caught.value.status, caught.value.type) == (400, "malformed_weights")
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_an_upload_over_the_limit_is_refused_from_its_header(
    perturbed: Perturb, tied_student: Path, tmp_path: Path, schema: WeightSchema
) -> None:
    data = encoded(perturbed(tied_student, seed=1).state_dict())
    with pytest.raises(ApiError) as caught:
        receive(as_stream(data), tmp_path, schema, max_bytes=4096)
    assert caught.value.status == 413
    assert f"declares {len(data)} bytes, over the limit 4096" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_the_upload_limit_is_the_model_in_float32(schema: WeightSchema) -> None:
    floats = sum(math.prod(shape) for shape in schema.shapes.values())
    assert floats * 4 < schema.max_file_bytes < floats * 4 + 128 * 1024


def test_a_stalled_upload_times_out(tmp_path: Path, schema: WeightSchema) -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield b"\x10\0\0\0\0\0\0\0"
        await asyncio.sleep(10)
        yield b""

    with pytest.raises(ApiError) as caught:
        receive(stalls(), tmp_path, schema, idle_timeout_s=0.2)
    assert (caught.value.status, caught.value.type) == (408, "upload_timeout")


def test_probe_equals_a_forward_pass_and_flags_other_weights(
    perturbed: Perturb, tied_student: Path
) -> None:
    model = perturbed(tied_student, seed=1)
    ids = probe_token_ids(128, length=16)
    assert ids == probe_token_ids(128, length=16)  # both sides derive the same sequence
    probe = make_probe(model, ids, atol=1e-4)
    tensor = torch.tensor([ids])
    expected, _ = sequence_logprobs(model, tensor, torch.ones_like(tensor))
    assert probe.logprobs == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert check_probe(probe, probe.logprobs) == 0.0
    other = make_probe(perturbed(tied_student, seed=2), ids)
    with pytest.raises(ApiError) as caught:
        check_probe(probe, other.logprobs)
    assert (caught.value.status, caught.value.type) == (422, "probe_mismatch")
    with pytest.raises(ApiError):
        check_probe(probe, [float("nan")] * len(probe.logprobs))
