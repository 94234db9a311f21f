"""The queue message schema refuses a completion whose logprob rows do not line up with its
tokens, or hold values that are no finite logprobs, wherever it is built or decoded; the
teacher's top-k travels packed and is checked the same way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from services.common import wire
from services.common.protocol import CompletionRecord, RolloutGroup, TeacherTopK


def record(**change: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "token_ids": [5, 6, 7],
        "rollout_logprobs": [-0.5, -1.0, -2.0],
        "teacher_logprobs": [-0.7, -1.5, -2.5],
        "reward": 1.0,
        "finish_reason": "stop",
    }
    return fields | change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rollout_logprobs": [-0.5, -1.0]}, "rollout_logprobs has 2 values for 3 completion"),
        ({"rollout_logprobs": [-0.5]}, "rollout_logprobs has 1 values for 3 completion"),
        ({"teacher_logprobs": [-1.0] * 4}, "teacher_logprobs has 4 values for 3 completion"),
        ({"teacher_logprobs": []}, "teacher_logprobs has 0 values for 3 completion"),
        ({"rollout_logprobs": [-0.5, math.nan, -2.0]}, "finite number"),
        ({"teacher_logprobs": [-0.5, -math.inf, -2.0]}, "finite number"),
        ({"reward": math.nan}, "finite number"),
        ({"rollout_logprobs": [-0.5, 0.25, 0.5]}, r"rollout_logprobs\[1\] = 0.25 is not a logprob"),
        ({"token_ids": [5, -1, 7]}, "greater than or equal to 0"),
    ],
    ids=[
        "rollout-short",
        "rollout-one-value",
        "teacher-long",
        "teacher-empty",
        "rollout-nan",
        "teacher-inf",
        "reward-nan",
        "probabilities",
        "negative-id",
    ],
)
def test_a_malformed_completion_is_refused_with_what_is_wrong(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        CompletionRecord.model_validate(record(**change))


def test_rounding_just_above_zero_and_empty_completions_are_accepted() -> None:
    CompletionRecord.model_validate(record(rollout_logprobs=[-0.5, 1e-6, 0.0]))
    CompletionRecord.model_validate(record(token_ids=[], rollout_logprobs=[], teacher_logprobs=[]))
    CompletionRecord.model_validate(record(teacher_logprobs=None))


def test_teacher_logprobs_filled_in_place_are_checked() -> None:
    """The scorer assigns the teacher's answer to each completion: a row of another length
    is refused there, before the group is published."""
    completion = CompletionRecord.model_validate(record(teacher_logprobs=None))
    with pytest.raises(ValidationError, match="teacher_logprobs has 2 values for 3"):
        completion.teacher_logprobs = [-1.0, -2.0]


def test_a_malformed_group_does_not_decode() -> None:
    """What the queue reads back is validated: a payload that bypassed the schema when it
    was written (here, built unchecked) is refused on decoding."""
    bad = CompletionRecord.model_construct(**record(rollout_logprobs=[-0.5, -1.0]))
    group = RolloutGroup.model_construct(
        group_id="g",
        prompt_id="p",
        task="kk",
        policy_version=0,
        prompt_token_ids=[1, 2],
        completions=[bad],
        teacher_revision=None,
        timestamps={},
    )
    with pytest.raises(ValidationError, match="rollout_logprobs has 2 values for 3"):
        wire.decode(wire.encode(group), RolloutGroup)
    empties: list[dict[str, Any]] = [{"prompt_token_ids": []}, {"completions": []}]
    for empty in empties:
        fields = group.model_dump() | {"completions": [record()]} | empty
        with pytest.raises(ValidationError, match="at least 1 item"):
            RolloutGroup.model_validate(fields)


# ---------------------------------------------------------------- the teacher's top-k


def top_k(ids: list[list[int]], logprobs: list[list[float]], k: int = 2) -> TeacherTopK:
    return TeacherTopK.from_rows(ids, logprobs, k)


GOOD_TOP_K = ([[4, 9], [1, 2], [7, 3]], [[-0.1, -2.5], [-1.0, -1.0], [-0.25, -3.75]])


def test_top_k_rows_pack_compactly_and_round_trip_through_msgpack_and_json() -> None:
    packed = top_k(*GOOD_TOP_K)
    assert (len(packed.ids), len(packed.logprobs)) == (3 * 2 * 4, 3 * 2 * 2)
    assert packed.id_array().tolist() == GOOD_TOP_K[0]
    # float16: exact for values it holds, within 2^-11 of the logprob otherwise (−0.1)
    assert packed.logprob_array().tolist()[1:] == GOOD_TOP_K[1][1:]
    assert abs(packed.logprob_array()[0, 0] + 0.1) <= 0.1 * 2**-11
    completion = CompletionRecord.model_validate(record(teacher_top_k=packed))
    decoded = wire.decode(wire.encode(completion), CompletionRecord)  # float32 rows: rounded
    assert decoded.teacher_top_k == packed
    assert CompletionRecord.model_validate_json(completion.model_dump_json()) == completion


@pytest.mark.parametrize(
    ("ids", "logprobs", "message"),
    [
        ([[4, 9], [1, 2]], [[-0.1, -2.5], [-1.0, -1.0]], "teacher_top_k has 2 rows for 3"),
        ([[4, 9, 1]] * 3, [[-0.1, -2.5, -3.0]] * 3, r"not \[3, 2\]"),
        ([[4, -9]] * 3, [[-0.1, -2.5]] * 3, "must be token ids"),
        ([[4, 9]] * 3, [[-2.5, -0.1]] * 3, "row 0 is not sorted best first"),
        ([[4, 9]] * 3, [[0.5, -0.1]] * 3, "above 0"),
        ([[4, 9]] * 3, [[math.nan, -0.1]] * 3, "finite"),
    ],
    ids=["rows", "k", "negative-id", "unsorted", "probability", "nan"],
)
def test_malformed_top_k_rows_are_refused(
    ids: list[list[int]], logprobs: list[list[float]], message: str
) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        CompletionRecord.model_validate(record(teacher_top_k=top_k(ids, logprobs)))


def test_top_k_bytes_from_the_wire_are_checked_too() -> None:
    """A payload that was never packed by `from_rows` is refused on decoding."""
    good = top_k(*GOOD_TOP_K)
    rising = np.array([[-2.0, -1.0]] * 3, dtype="<f2").tobytes()
    negative = np.array([[4, -1]] * 3, dtype="<i4").tobytes()
    for fields, message in [
        ({"ids": good.ids[:-1]}, "not \\[n_tokens, 2\\]"),
        ({"logprobs": rising}, "not sorted"),
        ({"ids": negative}, "negative"),
        ({"k": 0}, "greater than or equal to 1"),
    ]:
        bad = {**good.model_dump(), **fields}
        with pytest.raises(ValidationError, match=message):
            CompletionRecord.model_validate(record(teacher_top_k=bad))
    # -inf (a masked id) is kept finite: float16's floor, a probability of 0
    floored = top_k([[4, 9]], [[-0.5, -math.inf]]).logprob_array()
    assert floored[0, 1] == np.finfo(np.float16).min
