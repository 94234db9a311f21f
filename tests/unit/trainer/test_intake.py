"""What the trainer refuses of a well-formed group, given its run: another group size, ids
outside the student's vocabulary, and, for the algorithms that read them, missing teacher
logprobs."""

from __future__ import annotations

from services.common.protocol import CompletionRecord, RolloutGroup
from trainer.intake import Intake

TRRD = Intake(group_size=2, vocab_size=100, algorithm="trrd", needs_teacher=True)
GRPO = Intake(group_size=2, vocab_size=100, algorithm="grpo", needs_teacher=False)


def completion(ids: list[int], scored: bool = True) -> CompletionRecord:
    return CompletionRecord(
        token_ids=ids,
        rollout_logprobs=[-1.0] * len(ids),
        teacher_logprobs=[-2.0] * len(ids) if scored else None,
        reward=0.0,
        finish_reason="stop",
    )


def group(*completions: CompletionRecord, prompt: list[int] | None = None) -> RolloutGroup:
    return RolloutGroup(
        group_id="g",
        prompt_id="p",
        task="kk",
        policy_version=0,
        prompt_token_ids=prompt or [1, 2],
        completions=list(completions),
    )


def test_a_usable_group_passes() -> None:
    # An empty completion needs no teacher logprobs: it carries no loss.
    usable = group(completion([5, 6]), completion([], scored=False))
    assert TRRD.problem(usable) is None
    assert GRPO.problem(usable) is None


def test_another_group_size_is_refused() -> None:
    reason = TRRD.problem(group(completion([5]), completion([6]), completion([7])))
    assert reason is not None and reason.startswith("3 completions")
    assert "rollout.group_size 2" in reason


def test_ids_outside_the_vocabulary_are_refused() -> None:
    reason = GRPO.problem(group(completion([5, 100]), completion([6]), prompt=[1, 250]))
    assert reason is not None
    assert "token id 250 is outside the student's vocabulary (0..99), 2 such ids" in reason


def test_missing_teacher_logprobs_are_refused_where_the_algorithm_needs_them() -> None:
    unscored = group(completion([5, 6]), completion([7], scored=False))
    reason = TRRD.problem(unscored)
    assert reason is not None
    assert "completions [1] have no teacher_logprobs, which algorithm trrd needs" in reason
    assert GRPO.problem(unscored) is None


def test_an_undecodable_payload_is_refused() -> None:
    assert TRRD.problem(None) == "payload could not be decoded"


def scored_by(revision: str) -> RolloutGroup:
    return group(completion([5, 6]), completion([7])).model_copy(
        update={"teacher_revision": revision}
    )


def test_the_first_scored_group_pins_the_teacher_revision() -> None:
    intake = Intake(group_size=2, vocab_size=100, algorithm="trrd", needs_teacher=True)
    assert intake.problem(scored_by("aaa")) is None
    assert intake.problem(scored_by("aaa")) is None
    problem = intake.problem(scored_by("bbb"))
    assert problem is not None and problem.startswith(
        "scored by teacher revision bbb, but this run is pinned to aaa"
    )


def test_a_configured_revision_refuses_any_other() -> None:
    intake = Intake(
        group_size=2, vocab_size=100, algorithm="trrd", needs_teacher=True, teacher_revision="bbb"
    )
    assert intake.problem(scored_by("aaa")) is not None
    assert intake.problem(scored_by("bbb")) is None


def test_unscored_groups_pin_nothing() -> None:
    intake = Intake(group_size=2, vocab_size=100, algorithm="grpo", needs_teacher=False)
    unscored = group(completion([5], scored=False), completion([6], scored=False))
    assert intake.problem(unscored.model_copy(update={"teacher_revision": "x"})) is None
    assert intake.teacher_revision is None
