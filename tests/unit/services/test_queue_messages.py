"""The queue message schema refuses a completion whose logprob rows do not line up with its
tokens, or hold values that are no finite logprobs, wherever it is built or decoded."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from services.common import wire
from services.common.protocol import CompletionRecord, RolloutGroup


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
