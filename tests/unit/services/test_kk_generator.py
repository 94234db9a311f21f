"""K&K generation: unique solutions, determinism, held-out evaluation set, renderings."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from services.config.task import KKTaskConfig
from services.tasks import load_task
from services.tasks.kk import KKTask, export_jsonl
from services.tasks.kk_generator import KKPuzzle, KKSampler, evaluate, generate, solutions
from services.tasks.kk_render import pick_names, question, worked_reasoning

A, B = 0, 1


@pytest.mark.parametrize(
    ("statement", "table"),
    [
        # Truth over (A, B) = (T,T), (T,F), (F,T), (F,F), worked out by hand.
        (("knight", A), [True, True, False, False]),
        (("knave", B), [False, True, False, True]),
        (("not", ("knight", B)), [False, True, False, True]),
        (("and", ("knight", A), ("knave", B)), [False, True, False, False]),
        (("or", ("knave", A), ("knight", B)), [True, False, True, True]),
        (("->", ("knight", A), ("knight", B)), [True, False, True, True]),
        (("<=>", ("knight", A), ("knight", B)), [True, False, False, True]),
    ],
)
def test_evaluate_truth_tables(statement: tuple, table: list[bool]) -> None:
    assignments = [(True, True), (True, False), (False, True), (False, False)]
    assert [evaluate(statement, knights) for knights in assignments] == table


def test_solutions_by_hand() -> None:
    # A: "B is a knave"; B: "A and I are both knights" -> A knight, B knave only.
    statements = (("knave", B), ("and", ("knight", A), ("knight", B)))
    assert solutions(statements) == [(True, False)]
    # A: "I am a knight" alone has two solutions.
    assert len(solutions((("knight", A), ("knight", A)))) == 2


@pytest.mark.parametrize("people", range(2, 9))
def test_every_puzzle_has_exactly_one_solution_and_names_everyone(people: int) -> None:
    for seed in range(6):
        puzzle = generate(people, seed)
        assert solutions(puzzle.statements) == [puzzle.solution]
        for rendering in ("natural", "compact"):
            rng = random.Random(seed)
            names = pick_names(puzzle, rng, rendering)
            assert len(set(names)) == people
            text = question(puzzle, names, rendering, rng)
            assert all(name in text for name in names)
            if rendering == "compact":
                assert [line.split(":")[0] for line in text.splitlines()] == names


def test_sampler_never_says_i_am_a_knave() -> None:
    sampler = KKSampler(random.Random(0), 3)
    leaves = []

    def collect(statement: tuple, speaker: int) -> None:
        if statement[0] in ("knight", "knave"):
            leaves.append((statement, speaker))
        else:
            for part in statement[1:]:
                collect(part, speaker)

    for speaker in range(3):
        for _ in range(300):
            collect(sampler.statement(speaker, 2), speaker)
    assert leaves and all(s != ("knave", who) for s, who in leaves)


def test_generator_is_deterministic_per_seed() -> None:
    assert generate(5, 11) == generate(5, 11)
    assert generate(5, 11) != generate(5, 12)
    config = KKTaskConfig(people=[2, 4], eval_per_subset=5, seed=3)
    first, second = KKTask(config), KKTask(config)
    take = 20
    train_a = [p for _, p in zip(range(take), first.problems("train", seed=1), strict=False)]
    train_b = [p for _, p in zip(range(take), second.problems("train", seed=1), strict=False)]
    assert train_a == train_b
    assert list(first.problems("eval")) == list(second.problems("eval"))
    other = [p for _, p in zip(range(take), first.problems("train", seed=2), strict=False)]
    assert other != train_a
    other_seed = config.model_copy(update={"seed": 4})
    assert list(KKTask(other_seed).problems("eval")) != list(first.problems("eval"))


def test_eval_set_is_fixed_and_disjoint_from_training() -> None:
    # PPL2 has only ~400 distinct puzzles: a long training stream would hit the eval ones.
    task = KKTask(KKTaskConfig(people=[2], eval_per_subset=40))
    held_out = [puzzle.statements for _, puzzle, _ in task.puzzles("eval", seed=0)]
    assert len(held_out) == len(set(held_out)) == 40
    assert list(task.problems("eval", seed=0)) == list(task.problems("eval", seed=9))
    stream = task.puzzles("train", seed=0)
    trained = {next(stream)[1].statements for _ in range(2000)}
    assert trained.isdisjoint(held_out)
    assert len(trained) > 150  # the stream still covers the rest of the space


@pytest.mark.parametrize("rendering", ["natural", "compact"])
def test_problems_carry_prompt_subset_and_a_reference_that_scores_full(rendering: str) -> None:
    task = load_task(KKTaskConfig(people=[2, 3], rendering=rendering))
    problems = list(task.problems("eval"))
    assert {p.subset for p in problems} == {"PPL2", "PPL3"}
    assert len({p.prompt_id for p in problems}) == len(problems) == 200
    for problem in problems[::20]:
        assert problem.prompt.endswith("<think>")
        assert problem.reference is not None
        assert task.reward(problem, problem.reference).score == 3.0
    if rendering == "natural":
        assert "Knights always tell the truth" in problems[0].prompt
        assert "<|im_start|>assistant" in problems[0].prompt


def test_compact_reasoning_checks_every_assignment() -> None:
    # A: "B is a knave"; B: "A and B are knights" -> only A knight, B knave is consistent.
    puzzle = KKPuzzle(
        statements=(("knave", B), ("and", ("knight", A), ("knight", B))),
        solution=(True, False),
    )
    # Per line: assignment, then per person the truth of each operand and the verdict.
    assert worked_reasoning(puzzle, ["A", "B"], "compact").splitlines() == [
        "KK:0.-11+",  # A (knight) says B is a knave: false. B's "A and B": 1,1, true.
        "KN:1.+10+",
        "NK:0.+01-",
        "NN:1.-00+",
    ]
    lines = worked_reasoning(generate(3, 4), ["A", "B", "C"], "compact").splitlines()
    assert len(lines) == 8
    assert sum(line.count("-") == 0 for line in lines) == 1


def test_jsonl_export_round_trips(tmp_path) -> None:
    path = tmp_path / "kk.jsonl"
    task = KKTask(KKTaskConfig(people=[3], eval_per_subset=4))
    assert export_jsonl(task, "eval", path, count=4) == 4
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    problems = list(task.problems("eval"))
    assert [row["prompt_id"] for row in rows] == [p.prompt_id for p in problems]
    assert [row["prompt"] for row in rows] == [p.prompt for p in problems]
    for row in rows:
        statements = json.loads(json.dumps(row["statements"]), object_hook=None)
        as_tuples: Any = tuple(_tuples(s) for s in statements)
        assert solutions(as_tuples) == [tuple(row["solution"])]
        assert all(name in row["quiz"] for name in row["names"])


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
