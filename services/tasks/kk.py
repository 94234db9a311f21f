"""Knights and Knaves as an RL task: Logic-RL's prompt, answer parser and reward.

Reward (Logic-RL, `compute_score` of its K&K reward):
- format: +1 when the response holds exactly one `<think>`, `</think>`, `<answer>`,
  `</answer>`, in that order; -1 otherwise. Text around the tags is allowed.
- answer, judged only when the format holds: +2 when every person's role is right,
  -1.5 when the answer names every person but gets a role wrong, -2 when it cannot be
  parsed (a person missing, a role given twice, more or fewer roles than people, or an
  empty answer — Logic-RL gives an empty answer 0, which would pay +1 for saying nothing).
So: 3 correct, -0.5 wrong, -1 unparseable, -1 bad format.

The prompt ends with `<think>` (Logic-RL pre-fills it), so the response that is checked is
`<think>` + the completion: a completion that opens its own `<think>` repeats the tag.

    python -m services.tasks.kk kk.jsonl --people 3 --count 100   # export as JSON lines
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from services.config.task import KKTaskConfig
from services.tasks import Problem, Reward, Split
from services.tasks.kk_generator import KKPuzzle, KKSampler
from services.tasks.kk_render import gold_answer, pick_names, question, worked_reasoning

THINK_PREFILL = "<think>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
FORMAT_SCORE = 1.0
CORRECT_SCORE, WRONG_SCORE, UNPARSEABLE_SCORE = 2.0, -1.5, -2.0
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GOLD_LINE = re.compile(r"\(\d+\)\s*(\S+) is a (knight|knave)")
_ROLE_WORD = re.compile(r"knight|knave", re.IGNORECASE)

SYSTEM_PROMPT = (
    "You are a helpful assistant. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>.  Now the user "
    "asks you to solve a logical reasoning problem. After thinking, when you finally reach a "
    "conclusion, clearly state the identity of each character within <answer> </answer> "
    "tags. List the identity of each person one by one, for example, <answer> (1) Zoey is a "
    "knight\n(2) Oliver is a knight\n(3)... </answer>."
)


def logic_rl_prompt(question: str) -> str:
    """Logic-RL's chat prompt (Qwen's ChatML as text), pre-filled with `<think>`."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}"
        f"<|im_end|>\n<|im_start|>assistant\n{THINK_PREFILL}"
    )


def compact_prompt(question: str) -> str:
    """The compact rendering's prompt: the puzzle lines, then the pre-filled `<think>`."""
    return f"{question}\n{THINK_PREFILL}"


def parse_gold(answer: str) -> dict[str, str]:
    """Names and roles, in order, from a gold answer `(1) Zoey is a knight\\n...`."""
    return {name: role for name, role in _GOLD_LINE.findall(answer)}


def format_ok(response: str) -> bool:
    """Each tag exactly once, in the order think, /think, answer, /answer."""
    if any(response.count(tag) != 1 for tag in TAGS):
        return False
    positions = [response.find(tag) for tag in TAGS]
    return positions == sorted(positions)


def parse_answer(answer_text: str, names: list[str]) -> dict[str, str] | None:
    """Role of every person, or None when someone is missing or the answer is ambiguous.

    Case and whitespace are free (`zoey  IS a\\nKNIGHT`); every person needs exactly one
    `NAME is a knight|knave`, and the answer may not mention more roles than people.
    """
    if len(_ROLE_WORD.findall(answer_text)) != len(names):
        return None
    roles: dict[str, str] = {}
    for name in names:
        pattern = rf"(?<![A-Za-z]){re.escape(name)}\s+is\s+a\s+(knight|knave)(?![A-Za-z])"
        found = {m.lower() for m in re.findall(pattern, answer_text, re.IGNORECASE)}
        if len(found) != 1:
            return None
        roles[name] = found.pop()
    return roles


def score(completion: str, gold_answer: str) -> Reward:
    """Logic-RL's reward of one completion against the gold answer."""
    response = THINK_PREFILL + completion
    if not format_ok(response):
        return Reward(score=-FORMAT_SCORE, format_ok=False, correct=False)
    gold = parse_gold(gold_answer)
    answer_text = _ANSWER.findall(response)[-1].strip()
    predicted = parse_answer(answer_text, list(gold)) if answer_text else None
    if predicted is None:
        return Reward(score=FORMAT_SCORE + UNPARSEABLE_SCORE, format_ok=True, correct=False)
    correct = predicted == gold
    answer_score = CORRECT_SCORE if correct else WRONG_SCORE
    return Reward(score=FORMAT_SCORE + answer_score, format_ok=True, correct=correct)


class KKTask:
    """K&K puzzles PPL<n> for every n in `config.people`, rendered and scored as above."""

    name = "kk"

    def __init__(self, config: KKTaskConfig):
        self.config, self.seed = config, config.seed
        self._eval = list(self._eval_puzzles())
        self._eval_statements = {puzzle.statements for _, puzzle, _ in self._eval}

    def _sample(self, num_people: int, key: str) -> tuple[KKPuzzle, int]:
        """A puzzle and the seed of its rendering (names, phrasing), both fixed by `key`."""
        rng = random.Random(f"kk:{self.seed}:{key}")
        sampler = KKSampler(rng, num_people, self.config.depth, self.config.width)
        return sampler.puzzle(), rng.getrandbits(32)

    def _eval_puzzles(self) -> Iterator[tuple[str, KKPuzzle, int]]:
        for n in self.config.people:
            seen: set[tuple[object, ...]] = set()
            attempt = 0
            while len(seen) < self.config.eval_per_subset:
                puzzle, render_seed = self._sample(n, f"eval:{n}:{attempt}")
                attempt += 1
                if puzzle.statements not in seen:
                    seen.add(puzzle.statements)
                    yield f"kk-eval-ppl{n}-{len(seen) - 1}", puzzle, render_seed

    def _train_puzzles(self, seed: int) -> Iterator[tuple[str, KKPuzzle, int]]:
        picker = random.Random(f"kk-train:{self.seed}:{seed}")
        for index in itertools.count():
            n = picker.choice(self.config.people)
            puzzle, render_seed = self._sample(n, f"train:{seed}:{index}")
            if puzzle.statements not in self._eval_statements:  # keep eval held out
                yield f"kk-train-{seed}-{index}", puzzle, render_seed

    def puzzles(self, split: Split, seed: int) -> Iterator[tuple[str, KKPuzzle, int]]:
        """(prompt id, puzzle, rendering seed) — the raw material of `problems`."""
        return iter(self._eval) if split == "eval" else self._train_puzzles(seed)

    def render(self, prompt_id: str, puzzle: KKPuzzle, render_seed: int) -> Problem:
        names, text = self._text(puzzle, render_seed)
        gold = gold_answer(puzzle, names)
        reasoning = worked_reasoning(puzzle, names, self.config.rendering)
        compact = self.config.rendering == "compact"
        final = gold_answer(puzzle, names, numbered=not compact)  # compact: fewer tokens
        return Problem(
            prompt_id=prompt_id,
            prompt=compact_prompt(text) if compact else logic_rl_prompt(text),
            subset=f"PPL{puzzle.num_people}",
            answer=gold,
            reference=f"{reasoning}</think><answer>{final}</answer>",
        )

    def _text(self, puzzle: KKPuzzle, render_seed: int) -> tuple[list[str], str]:
        rng = random.Random(render_seed)
        names = pick_names(puzzle, rng, self.config.rendering)
        return names, question(puzzle, names, self.config.rendering, rng)

    def problems(self, split: Split, seed: int = 0) -> Iterator[Problem]:
        """`train`: endless stream ordered by `seed`; `eval`: the fixed held-out set (the
        same for every `seed`, fixed by the task seed; no training puzzle is in it)."""
        for prompt_id, puzzle, render_seed in self.puzzles(split, seed):
            yield self.render(prompt_id, puzzle, render_seed)

    def reward(self, problem: Problem, completion_text: str) -> Reward:
        return score(completion_text, problem.answer)


def export_jsonl(task: KKTask, split: Split, path: Path, count: int, seed: int = 0) -> int:
    """Write `count` problems as JSON lines, K&K-style fields beside the prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w") as out:
        for prompt_id, puzzle, render_seed in itertools.islice(task.puzzles(split, seed), count):
            names, text = task._text(puzzle, render_seed)
            problem = task.render(prompt_id, puzzle, render_seed)
            row = {
                "prompt_id": prompt_id,
                "subset": problem.subset,
                "quiz": text,
                "names": names,
                "statements": puzzle.statements,
                "solution": puzzle.solution,
                "solution_text": problem.answer,
                "prompt": problem.prompt,
                "reference": problem.reference,
            }
            out.write(json.dumps(row) + "\n")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Export K&K problems as JSON lines.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", choices=["train", "eval"], default="eval")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--people", default="2,3,4,5,6,7,8", help="comma-separated")
    parser.add_argument("--rendering", choices=["natural", "compact"], default="natural")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = KKTaskConfig(
        people=[int(n) for n in args.people.split(",")],
        rendering=args.rendering,
        eval_per_subset=args.count,
        seed=args.seed,
    )
    written = export_jsonl(KKTask(config), args.split, args.out, args.count)
    print(f"wrote {written} problems to {args.out}")


if __name__ == "__main__":
    main()
