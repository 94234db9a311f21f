"""`rlad bootstrap`: a tiny teacher that knows Knights and Knaves, and a weak student.

No weights are downloaded anywhere in this project, so the demo makes its own pair:
the character tokenizer and two Qwen2-architecture models from `services.bootstrap.tiny_models`
(vLLM CPU-compatible), then
1. the teacher (the larger model) learns K&K PPL2-PPL3 by SFT on generated worked
   solutions (compact rendering: every assignment checked in `<think>`, the answer in
   `<answer>`) for `teacher_steps` steps;
2. the student gets a short warm-up on the same data, half of whose examples answer at
   once, without the working and without the tags: it learns the format but also the
   habit of a model never taught it, so its reward is above the floor and well below the
   teacher's, and RL has something it can learn in minutes on a CPU
   (docs/results.md#the-embedded-demo-measured).
Greedy accuracy and mean reward of both on the held-out set are printed and stored in
`OUT/bootstrap.json`, which is also the cache stamp: each model records the settings it
was built with, and a second run rebuilds only a model whose settings changed.
Deterministic for a seed on one machine.

    rlad bootstrap --out artifacts/tiny --seed 0 --budget full
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.bootstrap.sft import SFTConfig, greedy_completions, sft
from services.bootstrap.tiny_models import SIZES, build_model, build_tokenizer
from services.config.task import KKTaskConfig
from services.tasks.kk import KKTask

STAMP = "bootstrap.json"
Role = Literal["teacher", "student"]
MODEL_SIZES: dict[Role, str] = {"teacher": "bootstrap-teacher", "student": "student"}  # SIZES
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Settings that shape only one of the two models; every other setting shapes both.
ROLE_SETTINGS: dict[Role, set[str]] = {
    "teacher": {"teacher_steps", "teacher_lr"},
    "student": {"student_steps", "student_lr", "bare_answer_share"},
}
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
    bare_answer_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the student's warm-up examples that give the answer lines alone "
        "(no working, no tags), which the reward scores -1. With 0 the student's sampled answers "
        "are at chance and RL did not move them in minutes; with 0.5 its first RL steps have a "
        "real choice to learn: work it out in the rewarded format or blurt an answer.",
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
            people=self.people,
            rendering="compact",
            eval_per_subset=self.eval_per_subset,
            seed=self.seed,
        )

    def fingerprint(self, role: Role) -> str:
        """Changes with every setting that changes `role`'s model (not with `out`)."""
        other = ROLE_SETTINGS["student" if role == "teacher" else "teacher"]
        settings = self.model_dump(mode="json", exclude={"out", *other})
        settings["size"] = SIZES[MODEL_SIZES[role]].model_dump()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class ModelScore(BaseModel):
    fingerprint: str = Field(description="`BootstrapConfig.fingerprint` of the model's settings.")
    accuracy: dict[str, float] = Field(description="Greedy accuracy per subset and `all`.")
    mean_reward: float
    format_rate: float
    train_seconds: float


class BootstrapResult(BaseModel):
    teacher: ModelScore
    student: ModelScore
    teacher_dir: str
    student_dir: str


def cached(config: BootstrapConfig, role: Role) -> ModelScore | None:
    """The stored score when `config.out` already holds `role`'s model built with these
    settings."""
    stamp = config.out / STAMP
    if not stamp.exists() or not all((config.out / role / f).exists() for f in MODEL_FILES):
        return None
    try:
        score = ModelScore.model_validate(json.loads(stamp.read_text())[role])
    except (ValueError, KeyError):  # a stamp from an older layout: rebuild
        return None
    return score if score.fingerprint == config.fingerprint(role) else None


def training_pairs(
    task: KKTask, config: BootstrapConfig, role: Role, seed: int
) -> Iterator[tuple[str, str]]:
    """Endless `(prompt, completion)` pairs; the student's include bare answers."""
    share = config.bare_answer_share if role == "student" else 0.0
    rng = random.Random(seed)
    for problem in task.problems("train", seed):
        reference = problem.reference or ""
        if rng.random() < share:
            reference = reference.split("<answer>")[-1].removesuffix("</answer>")
        yield problem.prompt, reference


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: KKTask,
    config: BootstrapConfig,
    role: Role,
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
        fingerprint=config.fingerprint(role),
        accuracy=accuracy,
        mean_reward=sum(rewards) / len(rewards),
        format_rate=sum(formats) / len(formats),
        train_seconds=round(seconds, 1),
    )


def bootstrap(config: BootstrapConfig, log: Callable[[str], None] = print) -> BootstrapResult:
    """Build, teach, score and save the pair; a model already built with the same settings
    is kept as it is."""
    torch.set_num_threads(config.threads)
    task = KKTask(config.task_config())
    tokenizer = build_tokenizer()
    scores = {role: hit for role in ROLE_SETTINGS if (hit := cached(config, role)) is not None}
    plan: tuple[tuple[Role, int, float, int], ...] = (
        ("teacher", config.teacher_steps, config.teacher_lr, 0),
        ("student", config.student_steps, config.student_lr, 1),
    )
    for role, steps, lr, offset in plan:
        if role in scores:
            log(f"{config.out / role} is up to date (settings {scores[role].fingerprint}); kept")
            continue
        model = build_model(
            SIZES[MODEL_SIZES[role]].model_copy(update={"seed": config.seed + offset}), tokenizer
        )
        pairs = training_pairs(task, config, role, config.seed + offset)
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
        scores[role] = score_model(model, tokenizer, task, config, role, time.monotonic() - start)
        folder = config.out / role
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        log(f"{role}: accuracy {scores[role].accuracy}, reward {scores[role].mean_reward:+.2f}")
        # The stamp, written after each model, so that an interrupted run keeps the teacher's
        # many minutes.
        stamp = {r: score.model_dump() for r, score in scores.items()}
        (config.out / STAMP).write_text(json.dumps(stamp, indent=2))
    return BootstrapResult(
        teacher=scores["teacher"],
        student=scores["student"],
        teacher_dir=str(config.out / "teacher"),
        student_dir=str(config.out / "student"),
    )
