"""Math word problems with a boxed-answer reward checked by `math-verify`.

Reward: 1 when the last `\\boxed{...}` of the completion is mathematically equal to the
gold answer (`math_verify.verify`: 1/2, 0.5 and \\frac{1}{2} agree), else 0; `format_ok`
says whether there was a boxed answer at all.

Data: a local JSONL or Parquet file per split, or a Hugging Face dataset name (needs the
`datasets` package), with the field names mapped in `MathTaskConfig`. Without an
evaluation source, a seeded `eval_size` slice of the training rows is held out.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from math_verify import parse, verify

from services.config.task import MathTaskConfig
from services.tasks import Problem, Reward, Split

DEFAULT_HELD_OUT = 100


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def answers_match(gold: str, predicted: str) -> bool:
    """`math-verify` equivalence of two LaTeX answers.

    Its timeouts use SIGALRM, which only the main thread may set: in worker threads the
    check runs without them (parsing a boxed answer is fast; the guard is for pathological
    expressions, which the main-thread paths still have).
    """
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    if not gold_parsed or not predicted_parsed:
        return gold.strip() == predicted.strip()
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def math_reward(completion: str, gold: str) -> Reward:
    boxed = last_boxed(completion)
    if boxed is None:
        return Reward(score=0.0, correct=False, format_ok=False)
    correct = answers_match(gold, boxed)
    return Reward(score=1.0 if correct else 0.0, correct=correct, format_ok=True)


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`/`.json` (one object per line) or `.parquet` file."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"math data file {path} does not exist")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(file).to_pylist())
    with file.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def read_hf(name: str, config_name: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:  # optional dependency
        raise ImportError("loading a Hugging Face dataset needs `pip install datasets`") from error
    return list(datasets.load_dataset(name, config_name, split=split))


class MathTask:
    """Problems from the configured rows; reward by `math_reward`."""

    name = "math"

    def __init__(self, config: MathTaskConfig):
        self.config = config
        train, evaluation = self._source("train"), self._source("eval")
        if evaluation is None:
            if train is None:
                raise ValueError("math task has no data: set train_path, eval_path or hf_dataset")
            order = list(range(len(train)))
            random.Random(f"math-held-out:{config.seed}").shuffle(order)
            held = set(order[: config.eval_size or min(DEFAULT_HELD_OUT, len(train) // 10 or 1)])
            evaluation = [row for i, row in enumerate(train) if i in held]
            train = [row for i, row in enumerate(train) if i not in held]
        eval_problems = [self._problem(row, f"math-eval-{i}") for i, row in enumerate(evaluation)]
        self._eval = eval_problems[: config.eval_size]
        held_out = {problem.prompt for problem in self._eval}
        self._train = [
            problem
            for i, row in enumerate(train or [])
            if (problem := self._problem(row, f"math-train-{i}")).prompt not in held_out
        ]

    def _source(self, split: Split) -> list[dict[str, Any]] | None:
        path = self.config.train_path if split == "train" else self.config.eval_path
        if path:
            return read_rows(path)
        if self.config.hf_dataset and not (self.config.train_path or self.config.eval_path):
            hf_split = self.config.train_split if split == "train" else self.config.eval_split
            return read_hf(self.config.hf_dataset, self.config.hf_config, hf_split)
        return None

    def _problem(self, row: dict[str, Any], prompt_id: str) -> Problem:
        config = self.config
        for field in (config.problem_field, config.answer_field):
            if field not in row:
                raise KeyError(f"row {prompt_id} has no field {field!r}; fields: {sorted(row)}")
        subset = str(row[config.subset_field]) if config.subset_field else config.subset_name
        solution = row.get(config.solution_field) if config.solution_field else None
        return Problem(
            prompt_id=prompt_id,
            prompt=config.prompt_template.format(problem=row[config.problem_field]),
            subset=subset,
            answer=str(row[config.answer_field]),
            reference=str(solution) if solution is not None else None,
        )

    def problems(self, split: Split, seed: int = 0) -> Iterator[Problem]:
        """`eval`: the held-out rows in order; `train`: endless, reshuffled every epoch."""
        if split == "eval":
            yield from self._eval
            return
        if not self._train:
            raise ValueError("math task has no training rows (set train_path or hf_dataset)")
        rng = random.Random(f"math-train:{seed}")
        while True:
            order = list(self._train)
            rng.shuffle(order)
            yield from order

    def reward(self, problem: Problem, completion_text: str) -> Reward:
        return math_reward(completion_text, problem.answer)
