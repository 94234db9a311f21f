"""Logic-RL's K&K reward on hand-written completions: every row's score is worked out
from the rule (format ±1; answer +2 right, -1.5 wrong, -2 unparseable; answer judged only
when the format holds). The prompt pre-fills `<think>`, so completions start inside it."""

from __future__ import annotations

import pytest

from services.tasks.kk import format_ok, parse_answer, parse_gold, score

GOLD = "(1) Zoey is a knight\n(2) Oliver is a knave"
RIGHT = "(1) Zoey is a knight\n(2) Oliver is a knave"

CASES = [
    # (why, completion, score, format_ok, correct)
    ("correct", f"Zoey is honest.</think><answer>{RIGHT}</answer>", 3.0, True, True),
    (
        "case and spacing",
        "x</think><answer> zoey   IS a\nKNIGHT,  OLIVER is a  Knave </answer>",
        3.0,
        True,
        True,
    ),
    (
        "any order, no numbers",
        "x</think><answer>Oliver is a knave. Zoey is a knight.</answer>",
        3.0,
        True,
        True,
    ),
    ("space between tags", f"x</think>\n\n<answer>\n{RIGHT}\n</answer>", 3.0, True, True),
    ("extra text around tags", f"x</think> So: <answer>{RIGHT}</answer> Done!", 3.0, True, True),
    (
        "wrong role",
        "x</think><answer>(1) Zoey is a knave\n(2) Oliver is a knave</answer>",
        -0.5,
        True,
        False,
    ),
    (
        "both wrong",
        "x</think><answer>(1) Zoey is a knave\n(2) Oliver is a knight</answer>",
        -0.5,
        True,
        False,
    ),
    ("a person missing", "x</think><answer>(1) Zoey is a knight</answer>", -1.0, True, False),
    (
        "a stranger instead",
        "x</think><answer>Zoey is a knight, Emma is a knave</answer>",
        -1.0,
        True,
        False,
    ),
    (
        "hedged: two roles for Zoey",
        "x</think><answer>Zoey is a knight or Zoey is a knave, Oliver is a knave</answer>",
        -1.0,
        True,
        False,
    ),
    (
        "same role twice: too many roles",
        "x</think><answer>Zoey is a knight. Zoey is a knight. Oliver is a knave</answer>",
        -1.0,
        True,
        False,
    ),
    (
        "name glued to text",
        "x</think><answer>Zoeyy is a knight, Oliver is a knave</answer>",
        -1.0,
        True,
        False,
    ),
    (
        "negation is not a role claim",
        "x</think><answer>Zoey is not a knave, Oliver is a knave</answer>",
        -1.0,
        True,
        False,
    ),
    ("empty answer", "x</think><answer>  </answer>", -1.0, True, False),
    ("missing </think>", f"x<answer>{RIGHT}</answer>", -1.0, False, False),
    ("missing answer tags", f"x</think>{RIGHT}", -1.0, False, False),
    ("unclosed answer", f"x</think><answer>{RIGHT}", -1.0, False, False),
    ("repeated <think>", f"<think>x</think><answer>{RIGHT}</answer>", -1.0, False, False),
    (
        "repeated answer",
        f"x</think><answer>{RIGHT}</answer><answer>{RIGHT}</answer>",
        -1.0,
        False,
        False,
    ),
    ("tags out of order", f"x<answer>{RIGHT}</answer></think>", -1.0, False, False),
    ("nothing", "", -1.0, False, False),
]


@pytest.mark.parametrize(("why", "completion", "expected", "fmt", "correct"), CASES)
def test_reward_table(why: str, completion: str, expected: float, fmt: bool, correct: bool) -> None:
    verdict = score(completion, GOLD)
    assert (verdict.score, verdict.format_ok, verdict.correct) == (expected, fmt, correct), why


def test_gold_parsing_keeps_order() -> None:
    assert parse_gold(GOLD) == {"Zoey": "knight", "Oliver": "knave"}
    assert list(parse_gold("(1) B is a knave\n(2) A is a knight")) == ["B", "A"]


def test_parser_needs_every_person() -> None:
    names = ["A", "B", "C"]
    assert parse_answer("a is a knight b is a KNAVE c is a knight", names) == {
        "A": "knight",
        "B": "knave",
        "C": "knight",
    }
    assert parse_answer("A is a knight, B is a knave", names) is None
    assert parse_answer("A is a knight, B is a knave, C is knight", names) is None


def test_format_checks_count_and_order() -> None:
    assert format_ok("<think>a</think><answer>b</answer>")
    assert not format_ok("<think>a</think><answer>b</answer></answer>")
    assert not format_ok("<answer>b</answer><think>a</think>")
