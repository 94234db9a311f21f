"""Math: boxed-answer reward through math-verify, and datasets from local files."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config.task import MathTaskConfig
from services.tasks import load_task
from services.tasks.math import last_boxed, math_reward


@pytest.mark.parametrize(
    ("completion", "gold", "score", "format_ok"),
    [
        ("so x = \\boxed{0.5}", "\\frac{1}{2}", 1.0, True),
        ("\\boxed{\\frac{1}{2}}", "1/2", 1.0, True),
        ("\\boxed{\\dfrac{2}{4}}", "0.5", 1.0, True),
        ("\\boxed{3}", "\\frac{1}{2}", 0.0, True),
        ("first \\boxed{7} then \\boxed{12}", "12", 1.0, True),  # the last box counts
        ("\\boxed{12} then \\boxed{7}", "12", 0.0, True),
        ("\\boxed{x^{2}+1}", "1 + x^2", 1.0, True),
        ("the answer is 12", "12", 0.0, False),  # no box, no credit
        ("\\boxed{12", "12", 0.0, False),  # unbalanced
        ("", "12", 0.0, False),
    ],
)
def test_math_reward_table(completion: str, gold: str, score: float, format_ok: bool) -> None:
    reward = math_reward(completion, gold)
    assert (reward.score, reward.format_ok, reward.correct) == (score, format_ok, score == 1.0)


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("a \\boxed{\\frac{a}{b}} b") == "\\frac{a}{b}"
    assert last_boxed("nothing") is None


def test_reward_runs_in_worker_threads() -> None:
    results = []
    worker = threading.Thread(target=lambda: results.append(math_reward("\\boxed{4}", "4")))
    worker.start()
    worker.join()
    assert results[0].correct


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_local_jsonl_with_field_mapping(tmp_path: Path) -> None:
    rows = [
        {"question": f"What is {i} + {i}?", "final": str(2 * i), "level": f"L{i % 2}"}
        for i in range(30)
    ]
    config = MathTaskConfig(
        train_path=_write_jsonl(tmp_path / "train.jsonl", rows),
        problem_field="question",
        answer_field="final",
        subset_field="level",
        eval_size=5,
    )
    task = load_task(config)
    held_out = list(task.problems("eval"))
    assert len(held_out) == 5 and {p.subset for p in held_out} <= {"L0", "L1"}
    stream = task.problems("train", seed=0)
    train = [next(stream) for _ in range(50)]  # endless: wraps after 25 rows
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held_out})
    assert len({p.prompt_id for p in train}) == 25
    problem = held_out[0]
    assert "\\boxed{}" in problem.prompt and problem.prompt.startswith("What is")
    assert task.reward(problem, f"\\boxed{{{problem.answer}}}").score == 1.0
    assert list(task.problems("eval")) == held_out


def test_separate_eval_file_and_missing_field(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "t.jsonl", [{"problem": "1+1", "answer": "2"}])
    evaluation = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "2+2", "answer": "4"}])
    task = load_task(MathTaskConfig(train_path=train, eval_path=evaluation))
    assert [p.answer for p in task.problems("eval")] == ["4"]
    assert next(task.problems("train")).answer == "2"
    with pytest.raises(KeyError, match="no field 'solution'"):
        load_task(MathTaskConfig(eval_path=evaluation, answer_field="solution"))


def test_math_needs_a_data_source() -> None:
    with pytest.raises(ValidationError, match="needs train_path"):
        MathTaskConfig()


def test_parquet_rows(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "3*3", "answer": "9"}] * 3), path)
    task = load_task(MathTaskConfig(eval_path=str(path)))
    assert [p.answer for p in task.problems("eval")] == ["9", "9", "9"]
