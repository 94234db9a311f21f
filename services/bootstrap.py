"""`rlad bootstrap`: a tiny teacher that knows Knights and Knaves, and a weak student.

No weights are downloaded anywhere in this project, so the demo makes its own pair:
the character tokenizer and two Qwen2-architecture models from `services.tiny_models`
(vLLM CPU-compatible), then
1. the teacher (the larger model) learns K&K PPL2-PPL3 by SFT on generated worked
   solutions (compact rendering: every assignment checked in `<think>`, the answer in
   `<answer>`) for `teacher_steps` steps;
2. the student gets a short warm-up on the same data: it learns the format, so its
   reward is above the floor, but it stays well below the teacher.
Greedy accuracy and mean reward of both on the held-out set are printed and stored in
`OUT/bootstrap.json`, which is also the cache stamp: a second run with the same settings
finds it and returns at once. Deterministic for a seed on one machine.

    rlad bootstrap --out artifacts/tiny --seed 0 --budget full
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.sft import SFTConfig, greedy_completions, sft
from services.tasks import KKTaskConfig
from services.tasks.kk import KKTask
from services.tiny_models import SIZES, build_model, build_tokenizer

STAMP = "bootstrap.json"
MODEL_SIZES = {"teacher": "bootstrap-teacher", "student": "student"}  # keys of SIZES
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
Budget = Literal["small", "full"]


class BootstrapConfig(BaseModel):
    out: Path = Field(description="Folder that receives `teacher/`, `student/` and the stamp.")
    seed: int = Field(default=0, description="Seeds model init, data order and the eval set.")
    budget: Budget = Field(
        default="full", description="`full`: the demo's models; `small`: seconds, for tests."
    )
    people: list[int] = Field(default=[2, 3], description="K&K subsets PPL<n> to learn.")
    teacher_steps: int = Field(default=600, ge=1, description="Teacher SFT steps.")
    student_steps: int = Field(
        default=200,
        ge=1,
        description="Student warm-up steps. Fewer (60) left a student that follows the format "
        "greedily but breaks it at temperature 1 (format 0.3), and RL updates on such a "
        "student mostly push down failed samples, which collapsed it within 10-30 steps.",
    )
    batch_size: int = Field(default=32, ge=1, description="SFT examples per step.")
    teacher_lr: float = Field(default=3e-3, gt=0)
    student_lr: float = Field(default=3e-3, gt=0)
    eval_per_subset: int = Field(default=100, ge=1, description="Held-out puzzles per subset.")
    max_new_tokens: int = Field(default=200, ge=1, description="Completion budget at eval.")
    threads: int = Field(
        default=1,
        ge=1,
        description="torch CPU threads. One is the default: on a small shared machine, "
        "OpenMP threads that wait for busy cores made decoding over 10x slower.",
    )

    @classmethod
    def for_budget(cls, out: Path, seed: int, budget: Budget) -> BootstrapConfig:
        if budget == "small":
            return cls(
                out=out,
                seed=seed,
                budget=budget,
                teacher_steps=3,
                student_steps=2,
                batch_size=4,
                eval_per_subset=3,
                max_new_tokens=40,
            )
        return cls(out=out, seed=seed, budget=budget)

    def task_config(self) -> KKTaskConfig:
        return KKTaskConfig(
            people=self.people, rendering="compact", eval_per_subset=self.eval_per_subset
        )

    def fingerprint(self) -> str:
        """Changes with every setting that changes the models (not with `out`)."""
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["sizes"] = {role: SIZES[size].model_dump() for role, size in MODEL_SIZES.items()}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class ModelScore(BaseModel):
    accuracy: dict[str, float] = Field(description="Greedy accuracy per subset and `all`.")
    mean_reward: float
    format_rate: float
    train_seconds: float


class BootstrapResult(BaseModel):
    fingerprint: str
    teacher: ModelScore
    student: ModelScore
    teacher_dir: str
    student_dir: str


def cached(config: BootstrapConfig) -> BootstrapResult | None:
    """The stored result when `config.out` already holds models built with these settings."""
    stamp = config.out / STAMP
    if not stamp.exists():
        return None
    result = BootstrapResult.model_validate_json(stamp.read_text())
    complete = all(
        (config.out / role / name).exists()
        for role in ("teacher", "student")
        for name in MODEL_FILES
    )
    return result if complete and result.fingerprint == config.fingerprint() else None


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: KKTask,
    config: BootstrapConfig,
    seconds: float,
) -> ModelScore:
    """Greedy accuracy, reward and format rate on the held-out set."""
    problems = list(task.problems("eval"))
    texts = greedy_completions(
        model, tokenizer, [p.prompt for p in problems], config.max_new_tokens
    )
    right: dict[str, list[bool]] = defaultdict(list)
    rewards, formats = [], []
    for problem, text in zip(problems, texts, strict=True):
        reward = task.reward(problem, text)
        right[problem.subset].append(reward.correct)
        rewards.append(reward.score)
        formats.append(reward.format_ok)
    accuracy = {subset: sum(v) / len(v) for subset, v in sorted(right.items())}
    accuracy["all"] = sum(sum(v) for v in right.values()) / len(problems)
    return ModelScore(
        accuracy=accuracy,
        mean_reward=sum(rewards) / len(rewards),
        format_rate=sum(formats) / len(formats),
        train_seconds=round(seconds, 1),
    )


def bootstrap(config: BootstrapConfig, log: Callable[[str], None] = print) -> BootstrapResult:
    """Build, teach, score and save the pair (or return the cached result)."""
    hit = cached(config)
    if hit is not None:
        log(f"{config.out} is up to date (settings {hit.fingerprint}); nothing to do")
        return hit
    torch.set_num_threads(config.threads)
    task = KKTask(config.task_config(), seed=config.seed)
    tokenizer = build_tokenizer()
    scores = {}
    plan = (
        ("teacher", config.teacher_steps, config.teacher_lr, 0),
        ("student", config.student_steps, config.student_lr, 1),
    )
    for role, steps, lr, offset in plan:
        model = build_model(
            SIZES[MODEL_SIZES[role]].model_copy(update={"seed": config.seed + offset}), tokenizer
        )
        pairs = (
            (p.prompt, p.reference or "") for p in task.problems("train", config.seed + offset)
        )
        log(f"{role}: SFT for {steps} steps on compact K&K {config.people}")
        start = time.monotonic()
        sft_config = SFTConfig(
            steps=steps,
            batch_size=config.batch_size,
            lr=lr,
            warmup_steps=min(20, steps // 10),
            seed=config.seed + offset,
        )
        sft(model, tokenizer, pairs, sft_config, log=log)
        scores[role] = score_model(model, tokenizer, task, config, time.monotonic() - start)
        folder = config.out / role
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        log(f"{role}: accuracy {scores[role].accuracy}, reward {scores[role].mean_reward:+.2f}")
    result = BootstrapResult(
        fingerprint=config.fingerprint(),
        teacher=scores["teacher"],
        student=scores["student"],
        teacher_dir=str(config.out / "teacher"),
        student_dir=str(config.out / "student"),
    )
    (config.out / STAMP).write_text(result.model_dump_json(indent=2))
    return result
