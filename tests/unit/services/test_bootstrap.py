"""The bootstrap's settings: which model each one rebuilds, and the student's mixed warm-up."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from services.bootstrap.build import BootstrapConfig, Role, training_pairs
from services.tasks.kk import THINK_PREFILL, KKTask, format_ok


def config(**update: object) -> BootstrapConfig:
    return BootstrapConfig(out=Path("unused")).model_copy(update=update)


@pytest.mark.parametrize(
    ("setting", "value", "changes"),
    [
        ("seed", 1, {"teacher", "student"}),
        ("people", [2], {"teacher", "student"}),
        ("teacher_steps", 7, {"teacher"}),
        ("teacher_lr", 1e-3, {"teacher"}),
        ("student_steps", 7, {"student"}),
        ("bare_answer_share", 0.0, {"student"}),
        ("out", Path("elsewhere"), set()),
    ],
)
def test_a_setting_changes_the_fingerprint_of_the_models_it_shapes(
    setting: str, value: object, changes: set[Role]
) -> None:
    base, changed = config(), config(**{setting: value})
    for role in ("teacher", "student"):
        moved = base.fingerprint(role) != changed.fingerprint(role)
        assert moved == (role in changes), role


def formatted(completion: str) -> bool:
    return format_ok(THINK_PREFILL + completion)  # the prompt ends with the opening tag


def pairs(role: Role, share: float, count: int = 400) -> list[tuple[str, str]]:
    settings = config(bare_answer_share=share)
    task = KKTask(settings.task_config())
    return list(itertools.islice(training_pairs(task, settings, role, seed=1), count))


def test_the_student_gets_bare_answers_in_the_configured_share() -> None:
    mixed = pairs("student", 0.5)
    bare = [completion for _, completion in mixed if not formatted(completion)]
    assert 0.4 < len(bare) / len(mixed) < 0.6
    for completion in bare:
        assert "<" not in completion and " is a kn" in completion  # the answer lines alone
    worked = pairs("student", 0.0)
    assert [p for p, _ in worked] == [p for p, _ in mixed]  # same puzzles, same order
    assert all(formatted(completion) for _, completion in worked)


def test_a_bare_answer_is_the_gold_answer_of_its_worked_reference() -> None:
    for (_, bare), (_, worked) in zip(pairs("student", 1.0), pairs("student", 0.0), strict=True):
        assert worked.endswith(f"<answer>{bare}</answer>")


def test_the_teacher_learns_from_worked_solutions_only() -> None:
    assert all(formatted(completion) for _, completion in pairs("teacher", 1.0))
