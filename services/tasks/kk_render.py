"""Text for Knights and Knaves puzzles: the question, the gold answer, a worked solution.

Two renderings of the same puzzle:
- `natural`: the K&K benchmark's English ("You meet 3 inhabitants: Zoey, Oliver and
  Emma. Zoey said, "Oliver is a knave and Emma is a knight." ..."), with names drawn from
  a list and the phrasing drawn from varied templates.
- `compact`: the same logic in a few symbols, short enough for character-level tiny models:
  people `A`, `B`, ...; `A` "A is a knight", `~A` "A is a knave", `!` not, `&` and,
  `|` or, `>` if-then, `=` if-and-only-if; one line per speaker, e.g. `B: A&~C`.
The gold answer is Logic-RL's: one line per person, `(1) Zoey is a knight`.
"""

from __future__ import annotations

import itertools
import random

from services.tasks.kk_generator import KKPuzzle, Statement, evaluate

NAMES = [
    "Zoey",
    "Oliver",
    "Emma",
    "Liam",
    "Ava",
    "Noah",
    "Mia",
    "Elijah",
    "Sofia",
    "Lucas",
    "Amelia",
    "Mason",
    "Harper",
    "Ethan",
    "Evelyn",
    "James",
    "Abigail",
    "Logan",
    "Emily",
    "Jacob",
    "Ella",
    "Jack",
    "Grace",
    "Owen",
    "Chloe",
    "Henry",
    "Lily",
    "Samuel",
    "Aria",
    "Leo",
    "Riley",
    "Daniel",
    "Nora",
    "Michael",
    "Zoe",
    "Aiden",
    "Luna",
    "Benjamin",
    "Stella",
    "William",
    "Hazel",
    "David",
    "Violet",
    "Joseph",
    "Aurora",
    "Isabella",
    "Sebastian",
    "Scarlett",
    "Matthew",
    "Victoria",
    "Alexander",
    "Penelope",
    "Gabriel",
]
COMPACT_NAMES = "ABCDEFGH"
COMPACT_SYMBOLS = {"and": "&", "or": "|", "->": ">", "<=>": "="}
SAY_TEMPLATES = (
    '{name} said, "{claim}."',
    "{name} told you that {claim}.",
    'In {name}\'s words: "{claim}".',
    '{name} stated, "{claim}."',
    '{name} remarked, "{claim}."',
    '"{claim}," claimed {name}.',
    'According to {name}, "{claim}".',
    '{name} asserted: "{claim}."',
)
INTRO = (
    "A very special island is inhabited only by knights and knaves. Knights always tell "
    "the truth, and knaves always lie. You meet {count} inhabitants: {names}."
)
QUESTION = "So who is a knight and who is a knave?"


def pick_names(puzzle: KKPuzzle, rng: random.Random, rendering: str) -> list[str]:
    if rendering == "compact":
        return list(COMPACT_NAMES[: puzzle.num_people])
    return rng.sample(NAMES, puzzle.num_people)


def _list_names(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def _natural_claim(statement: Statement, names: list[str], nested: bool = False) -> str:
    op = statement[0]
    if op in ("knight", "knave"):
        return f"{names[statement[1]]} is a {op}"
    parts = [_natural_claim(s, names, nested=True) for s in statement[1:]]
    if op == "not":
        inner = statement[1]
        if inner[0] in ("knight", "knave"):
            return parts[0].replace(" is a ", " is not a ", 1)
        text = f"it is not the case that {parts[0]}"
    elif op in ("and", "or"):
        text = f" {op} ".join(parts)
    elif op == "->":
        text = f"if {parts[0]} then {parts[1]}"
    else:
        text = f"{parts[0]} if and only if {parts[1]}"
    return f"({text})" if nested else text


def _compact_claim(statement: Statement, nested: bool = False) -> str:
    op = statement[0]
    if op == "knight":
        return COMPACT_NAMES[statement[1]]
    if op == "knave":
        return "~" + COMPACT_NAMES[statement[1]]
    parts = [_compact_claim(s, nested=True) for s in statement[1:]]
    if op == "not":
        return "!" + parts[0]
    text = COMPACT_SYMBOLS[op].join(parts)
    return f"({text})" if nested else text


def question(puzzle: KKPuzzle, names: list[str], rendering: str, rng: random.Random) -> str:
    """The puzzle as text; every person is named."""
    if rendering == "compact":
        lines = [f"{names[i]}: {_compact_claim(s)}" for i, s in enumerate(puzzle.statements)]
        return "\n".join(lines)
    says = [
        rng.choice(SAY_TEMPLATES).format(name=names[i], claim=_natural_claim(s, names))
        for i, s in enumerate(puzzle.statements)
    ]
    intro = INTRO.format(count=puzzle.num_people, names=_list_names(names))
    return " ".join([intro, *says, QUESTION])


def role(knight: bool) -> str:
    return "knight" if knight else "knave"


def gold_answer(puzzle: KKPuzzle, names: list[str], numbered: bool = True) -> str:
    """Logic-RL's answer lines, `(1) Zoey is a knight`, one per person in order (without
    the numbers for compact references: the parser does not need them)."""
    return "\n".join(
        f"({i + 1}) {name} is a {role(k)}" if numbered else f"{name} is a {role(k)}"
        for i, (name, k) in enumerate(zip(names, puzzle.solution, strict=True))
    )


def _people_in(statement: Statement) -> set[int]:
    if statement[0] in ("knight", "knave"):
        return {statement[1]}
    return set().union(*(_people_in(s) for s in statement[1:]))


def _operands(statement: Statement) -> list[Statement]:
    """The parts an operator combines; a bare claim is its own single operand."""
    return [statement] if statement[0] in ("knight", "knave") else list(statement[1:])


def _compact_search(puzzle: KKPuzzle) -> list[str]:
    """Every assignment in turn (`K` knight, `N` knave), then per person the truth (`1`/`0`)
    of each operand of their statement and `+`/`-`: does the statement agree with their
    role under it. The one line with every mark `+` is the answer.

    Writing the operands first leaves one small step per character (a lookup, then an
    operator), which a tiny model learns far sooner than whole statements in one step.
    """
    width = max(len(_operands(s)) for s in puzzle.statements)
    lines = []
    for knights in itertools.product((True, False), repeat=puzzle.num_people):
        chunks = []
        for statement, knight in zip(puzzle.statements, knights, strict=True):
            values = "".join("1" if evaluate(op, knights) else "0" for op in _operands(statement))
            mark = "+" if evaluate(statement, knights) == knight else "-"
            chunks.append(values.ljust(width, ".") + mark)
        lines.append("".join("K" if k else "N" for k in knights) + ":" + "".join(chunks))
    return lines


def _natural_search(puzzle: KKPuzzle, names: list[str]) -> list[str]:
    """Depth-first search in words: assume roles in order, check each statement as soon
    as everyone it mentions has a role, back up on a contradiction."""
    n, lines = puzzle.num_people, []
    # Statement i can be checked once persons 0..ready[i] all have roles.
    ready = [max(_people_in(s) | {i}) for i, s in enumerate(puzzle.statements)]

    def search(assigned: tuple[bool, ...]) -> bool:
        if len(assigned) == n:
            return True
        person = len(assigned)
        for knight in (True, False):
            trial = (*assigned, knight)
            padded = trial + (True,) * (n - len(trial))  # unassigned roles are never read
            line = f"Suppose {names[person]} is a {role(knight)}."
            bad = [
                i
                for i in range(n)
                if ready[i] == person and evaluate(puzzle.statements[i], padded) != trial[i]
            ]
            if bad:
                said = "false" if trial[bad[0]] else "true"
                lines.append(
                    f"{line} Then {names[bad[0]]}'s statement is {said}, which a "
                    f"{role(trial[bad[0]])} cannot say: contradiction."
                )
                continue
            lines.append(line + " No contradiction so far.")
            if search(trial):
                return True
        lines.append(f"Neither role works for {names[person]}, so an earlier guess was wrong.")
        return False

    search(())
    return lines


def worked_reasoning(puzzle: KKPuzzle, names: list[str], rendering: str) -> str:
    """The reasoning of a reference completion (what goes inside `<think>`)."""
    if rendering == "compact":
        return "\n".join(_compact_search(puzzle))
    lines = _natural_search(puzzle, names)
    return " ".join([*lines, "Everyone's statement fits this assignment."])
