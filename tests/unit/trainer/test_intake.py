"""What the trainer refuses of a well-formed group, given its run: another group size, ids
outside the student's vocabulary, and, for the algorithms that read them, missing teacher
logprobs or the teacher's top-k."""

from __future__ import annotations

from services.common.protocol import CompletionRecord, RolloutGroup, TeacherTopK
from trainer.intake import Intake


def intake(algorithm: str, revisions: dict[str, str] | None = None) -> Intake:
    needs_teacher, on_every_group = {"trrd": (True, False), "grpo": (False, False)}.get(
        algorithm, (True, True)
    )
    return Intake(2, 100, algorithm, needs_teacher, on_every_group, dict(revisions or {}))


TRRD, GRPO, KDRL = intake("trrd"), intake("grpo"), intake("kdrl")


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
    rewarded = completion([7], scored=False)
    rewarded.reward = 1.0  # rewards differ: the loss reads the teacher
    unscored = group(completion([5, 6]), rewarded)
    reason = TRRD.problem(unscored)
    assert reason is not None
    assert "completions [1] have no teacher_logprobs, which algorithm trrd needs" in reason
    assert GRPO.problem(unscored) is None


def test_an_undecodable_payload_is_refused() -> None:
    assert TRRD.problem(None) == "payload could not be decoded"


def scored_by(revision: str, pool: str | None = None) -> RolloutGroup:
    return group(completion([5, 6]), completion([7])).model_copy(
        update={"teacher_revision": revision, "teacher_pool": pool}
    )


def test_the_first_scored_group_pins_the_teacher_revision() -> None:
    pinned = intake("trrd")
    assert pinned.problem(scored_by("aaa")) is None
    assert pinned.problem(scored_by("aaa")) is None
    problem = pinned.problem(scored_by("bbb"))
    assert problem is not None and problem.startswith(
        "scored by teacher revision bbb of pool default, but this run pins pool default to aaa"
    )


def test_a_configured_revision_refuses_any_other() -> None:
    pinned = intake("trrd", {"default": "bbb"})
    assert pinned.problem(scored_by("aaa")) is not None
    assert pinned.problem(scored_by("bbb")) is None


def test_each_teacher_pool_is_pinned_to_its_own_revision() -> None:
    pinned = intake("trrd", {"math": "mmm"})
    assert pinned.problem(scored_by("mmm", "math")) is None
    assert pinned.problem(scored_by("lll", "logic")) is None  # pins logic to lll
    assert pinned.teacher_revisions == {"math": "mmm", "logic": "lll"}
    refused = pinned.problem(scored_by("mmm", "logic"))
    assert refused is not None and "this run pins pool logic to lll" in refused
    assert pinned.problem(scored_by("lll", "math")) is not None
    # A group scored before pools were recorded counts as the one pool `default`.
    assert pinned.problem(scored_by("ddd")) is None
    assert pinned.teacher_revisions["default"] == "ddd"


def test_a_resumed_run_keeps_its_pins_unless_the_config_names_others() -> None:
    resumed = intake("trrd", {"math": "new"})
    resumed.resume_pins({"math": "old", "logic": "lll"})
    assert resumed.teacher_revisions == {"math": "new", "logic": "lll"}
    assert resumed.problem(scored_by("other", "logic")) is not None


def test_unscored_groups_pin_nothing() -> None:
    grpo = intake("grpo")
    unscored = group(completion([5], scored=False), completion([6], scored=False))
    assert grpo.problem(unscored.model_copy(update={"teacher_revision": "x"})) is None
    assert grpo.teacher_revisions == {}


def test_teacher_logprobs_are_needed_only_where_the_loss_reads_them() -> None:
    def unscored_group(rewards: tuple[float, float], degraded: bool = False) -> RolloutGroup:
        completions = [completion([5], scored=False), completion([6], scored=False)]
        for record, reward in zip(completions, rewards, strict=True):
            record.reward = reward
        return group(*completions).model_copy(update={"degraded": degraded})

    skipped = unscored_group((1.0, 1.0))  # equal rewards: advantages 0, the scorer skips it
    assert TRRD.problem(skipped) is None
    assert KDRL.problem(skipped) is not None  # the KD term reads the teacher whatever A is
    mixed = unscored_group((0.0, 1.0))
    problem = TRRD.problem(mixed)
    assert problem is not None and "algorithm trrd needs" in problem
    assert GRPO.problem(mixed) is None
    degraded = unscored_group((0.0, 1.0), degraded=True)  # trained with alpha = 1, no KD
    assert TRRD.problem(degraded) is None and KDRL.problem(degraded) is None


def test_kd_estimator_topk_needs_the_runs_top_k_within_the_vocabulary() -> None:
    needs = Intake(2, 100, "kdrl", True, True, top_k=2)
    ranked = TeacherTopK.from_rows([[5, 6], [7, 8]], [[-0.5, -1.0], [-0.5, -1.0]], 2)
    with_top_k = completion([5, 6])
    with_top_k.teacher_top_k = ranked
    # The empty completion carries no loss, so no top-k either.
    assert needs.problem(group(with_top_k, completion([], scored=False))) is None
    problem = needs.problem(group(with_top_k, completion([7, 8])))
    assert problem is not None and "completions [1] have no teacher top-k" in problem
    assert "scorer.top_k 2" in problem
    other_k = completion([5, 6])
    other_k.teacher_top_k = TeacherTopK.from_rows([[5], [7]], [[-0.5], [-0.5]], 1)
    problem = needs.problem(group(with_top_k, other_k))
    assert problem is not None and "k = 1, where this run's scorer.top_k is 2" in problem
    outside = completion([5, 6])
    outside.teacher_top_k = TeacherTopK.from_rows([[5, 100], [7, 8]], [[-0.5, -1.0]] * 2, 2)
    problem = needs.problem(group(with_top_k, outside))
    assert problem is not None and "top-k id 100 is outside the student's vocabulary" in problem
    # A degraded group is trained without any teacher term: nothing to check.
    degraded = group(completion([5, 6], scored=False), completion([7], scored=False))
    degraded.degraded = True
    assert needs.problem(degraded) is None
    # Without the topk estimator, top-k rows are neither needed nor read.
    assert KDRL.problem(group(completion([5, 6]), completion([7, 8]))) is None
