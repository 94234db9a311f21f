"""The compact msgpack encoding: exact round trips, raw arrays, and clear errors."""

from __future__ import annotations

import msgpack
import pytest

from services.common import wire
from services.common.protocol import CompletionRecord, RolloutGroup, ScoreRequest, ScoreSequence


def test_group_round_trips_and_packs_arrays_as_raw_bytes() -> None:
    group = RolloutGroup(
        group_id="g",
        prompt_id="p",
        task="kk",
        policy_version=3,
        prompt_token_ids=list(range(1000)),
        completions=[
            CompletionRecord(
                token_ids=[5, 6, 7],
                rollout_logprobs=[-0.5, -1.25, -3.0],  # exactly representable in float32
                reward=2.0,
                finish_reason="stop",
                correct=True,
                teacher_logprobs=[-0.25, -0.5, -4.0],
            )
        ],
        timestamps={"generated": 1.5},
    )
    data = wire.encode(group)
    assert wire.decode(data, RolloutGroup) == group
    # 1,000 ids as int32 bytes (~4 KB), where msgpack ints would take ~2.9 KB + JSON ~4.9 KB;
    # the field names and the small values take the rest (under 500 bytes):
    assert len(data) < 4 * 1000 + 500
    raw = msgpack.unpackb(data, raw=False)
    assert isinstance(raw["prompt_token_ids"], msgpack.ExtType)


def test_ints_outside_int32_fall_back_to_plain_msgpack() -> None:
    request = ScoreRequest(sequences=[ScoreSequence(token_ids=[1, 2**40], start=1)])
    assert wire.decode(wire.encode(request), ScoreRequest) == request


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb({"a": msgpack.ExtType(9, b"xx")}), b"\x92\x01"],
    ids=["empty", "reserved-byte", "unknown-ext", "truncated"],
)
def test_malformed_bodies_raise_wire_decode_error(data: bytes) -> None:
    with pytest.raises(wire.WireDecodeError):
        wire.decode_raw(data)
