"""Knights and Knaves puzzles, generated the way the K&K benchmark does it.

Every inhabitant makes one statement, a random formula over claims "X is a knight" /
"X is a knave" joined by not, and, or, if-then and if-and-only-if (K&K's depth 2 and
width 2 by default). A puzzle is kept only when brute force over all 2^n assignments finds
exactly one consistent assignment: knights' statements true, knaves' statements false.
The sampler mirrors the benchmark's (`lib/kk_proc.py` of the K&K release) with a seeded
`random.Random`, so a seed fixes every puzzle.

    python -m services.tasks.kk_generator 3 --seed 0    # print a few PPL3 puzzles
"""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass
from typing import Any

# A statement is a nested tuple, as in the benchmark:
#   ("knight", i) / ("knave", i)          person i is a knight / a knave
#   ("not", s) ("and", s1, s2, ...) ("or", s1, s2, ...) ("->", s1, s2) ("<=>", s1, s2)
Statement = tuple[Any, ...]
LEAVES = ("knight", "knave")
BINARY = ("and", "or", "->", "<=>")


@dataclass(frozen=True)
class KKPuzzle:
    statements: tuple[Statement, ...]  # statements[i] is what person i says
    solution: tuple[bool, ...]  # solution[i]: person i is a knight

    @property
    def num_people(self) -> int:
        return len(self.statements)


def evaluate(statement: Statement, knights: tuple[bool, ...]) -> bool:
    """Truth of `statement` when `knights[i]` tells whether person i is a knight."""
    op = statement[0]
    if op == "knight":
        return knights[statement[1]]
    if op == "knave":
        return not knights[statement[1]]
    parts = [evaluate(s, knights) for s in statement[1:]]
    if op == "not":
        return not parts[0]
    if op == "and":
        return all(parts)
    if op == "or":
        return any(parts)
    if op == "->":
        return (not parts[0]) or parts[1]
    if op == "<=>":
        return parts[0] == parts[1]
    raise ValueError(f"unknown operator {op!r}")


def consistent(statements: tuple[Statement, ...], knights: tuple[bool, ...]) -> bool:
    """Knights say true things and knaves false ones."""
    return all(evaluate(s, knights) == k for s, k in zip(statements, knights, strict=True))


def solutions(statements: tuple[Statement, ...]) -> list[tuple[bool, ...]]:
    """Every consistent assignment, by brute force over all 2^n of them."""
    n = len(statements)
    return [
        knights
        for knights in itertools.product((True, False), repeat=n)
        if consistent(statements, knights)
    ]


class KKSampler:
    """Random statements with the benchmark's operator mix, for `num_people` inhabitants."""

    def __init__(self, rng: random.Random, num_people: int, depth: int = 2, width: int = 2):
        if num_people < 2:
            raise ValueError("a puzzle needs at least 2 people")
        self.rng, self.num_people, self.depth, self.width = rng, num_people, depth, width

    def statement(self, speaker: int, depth: int) -> Statement:
        dice = self.rng.randrange(6)
        if depth == 1 or dice == 0:
            while True:
                role = self.rng.choice(LEAVES)
                person = self.rng.randrange(self.num_people)
                # "I am a knave" has no consistent speaker: the benchmark never samples it.
                if not (role == "knave" and person == speaker):
                    return (role, person)
        if dice == 1:
            return ("not", self.statement(speaker, depth - 1))
        if dice in (2, 3):
            count = self.rng.randint(2, self.width)
            return (("and", "or")[dice - 2], *self._distinct(speaker, depth - 1, count))
        return (("->", "<=>")[dice - 4], *self._distinct(speaker, depth - 1, 2))

    def _distinct(self, speaker: int, depth: int, count: int) -> list[Statement]:
        parts: list[Statement] = []
        while len(parts) < count:
            part = self.statement(speaker, depth)
            if part not in parts:
                parts.append(part)
        return parts

    def puzzle(self, max_tries: int = 10_000) -> KKPuzzle:
        """A puzzle with exactly one solution (resampling until one is found)."""
        for _ in range(max_tries):
            statements = tuple(self.statement(i, self.depth) for i in range(self.num_people))
            found = solutions(statements)
            if len(found) == 1:
                return KKPuzzle(statements=statements, solution=found[0])
        raise RuntimeError(f"no uniquely solvable puzzle in {max_tries} tries")


def generate(num_people: int, seed: int, depth: int = 2, width: int = 2) -> KKPuzzle:
    """One puzzle, fully determined by its arguments."""
    return KKSampler(random.Random(seed), num_people, depth, width).puzzle()


if __name__ == "__main__":
    people = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    for offset in range(3):
        print(generate(people, seed + offset))
