"""Evaluation: Mean@k and Pass@k per subset, sampled through a rollout engine.

`evaluate` sends every held-out problem of a task to anything with
`async generate(GenerateRequest) -> GenerateResponse` — the in-process rollout engine
(`rollout_server.backends.load_engine`) or the HTTP `RolloutClient` — asks for k samples
each, scores them with the task's reward and reports per subset (PPL2..PPL8, or one per
benchmark):
- Mean@k: accuracy averaged over the k samples of every problem;
- Pass@j for j = 1, 2, 4, ..., k: the unbiased estimator of Chen et al. (2021),
  `1 - C(n-c, j) / C(n, j)` for c correct out of n samples, averaged over problems.
`rlad eval` wraps it; `write_report` saves the JSON and a PNG plot.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.common.protocol import GenerateRequest, GenerateResponse, SamplingParams
from services.tasks import Problem, Task


class Generator(Protocol):
    async def generate(self, request: GenerateRequest) -> GenerateResponse: ...


class EvalConfig(BaseModel):
    k: int = Field(default=8, ge=1, le=256, description="Samples per problem.")
    temperature: float = Field(default=0.6, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=1024, ge=1, description="Longest completion sampled.")
    seed: int = Field(default=0, description="Sampling seed (same seed, same samples).")
    limit_per_subset: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N problems of each subset."
    )
    prompts_per_request: int = Field(
        default=32, ge=1, description="Problems batched into one generate request."
    )


class SubsetResult(BaseModel):
    subset: str
    problems: int = Field(description="Problems evaluated in this subset.")
    mean_at_k: float = Field(description="Accuracy averaged over all k samples of all problems.")
    pass_at: dict[int, float] = Field(description="Unbiased Pass@j for j = 1, 2, 4, ..., k.")
    format_rate: float = Field(description="Share of samples that followed the answer format.")
    mean_reward: float = Field(description="Reward averaged over all samples.")
    mean_tokens: float = Field(description="Completion length in tokens, averaged.")


class EvalReport(BaseModel):
    model: str
    task: str
    k: int
    temperature: float
    top_p: float
    subsets: list[SubsetResult]
    overall: SubsetResult


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product, `1 - prod_{i=n-c+1..n} (1 - k/i)`, which never forms the huge
    binomials (Chen et al. 2021, Fig. 3).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks = [2**i for i in range(k.bit_length()) if 2**i <= k]
    return ks if ks[-1] == k else [*ks, k]


def summarize(
    subset: str, samples: list[list[tuple[bool, bool, float, int]]], k: int
) -> SubsetResult:
    """Per-problem lists of (correct, format_ok, reward, tokens) → the subset's figures."""
    flat = [s for problem in samples for s in problem]
    return SubsetResult(
        subset=subset,
        problems=len(samples),
        mean_at_k=sum(s[0] for s in flat) / len(flat),
        pass_at={
            j: sum(pass_at_k(len(p), sum(s[0] for s in p), j) for p in samples) / len(samples)
            for j in pass_ks(k)
        },
        format_rate=sum(s[1] for s in flat) / len(flat),
        mean_reward=sum(s[2] for s in flat) / len(flat),
        mean_tokens=sum(s[3] for s in flat) / len(flat),
    )


def select_problems(task: Task, limit_per_subset: int | None) -> list[Problem]:
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for problem in task.problems("eval", seed=0):
        if limit_per_subset is None or taken[problem.subset] < limit_per_subset:
            taken[problem.subset] += 1
            chosen.append(problem)
    return chosen


async def evaluate(
    generator: Generator, tokenizer: Any, task: Task, config: EvalConfig, model: str
) -> EvalReport:
    """Sample k completions of every held-out problem and score them (see module doc)."""
    problems = select_problems(task, config.limit_per_subset)
    sampling = SamplingParams(
        n=config.k,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        seed=config.seed,
    )
    per_subset: dict[str, list[list[tuple[bool, bool, float, int]]]] = defaultdict(list)
    for start in range(0, len(problems), config.prompts_per_request):
        batch = problems[start : start + config.prompts_per_request]
        prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in batch]
        response = await generator.generate(GenerateRequest(prompts=prompts, sampling=sampling))
        for problem, result in zip(batch, response.results, strict=True):
            scored = []
            for completion in result.completions:
                text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                reward = task.reward(problem, text)
                scored.append(
                    (reward.correct, reward.format_ok, reward.score, len(completion.token_ids))
                )
            per_subset[problem.subset].append(scored)
    subsets = [summarize(name, per_subset[name], config.k) for name in sorted(per_subset)]
    everything = [p for name in sorted(per_subset) for p in per_subset[name]]
    return EvalReport(
        model=model,
        task=task.name,
        k=config.k,
        temperature=config.temperature,
        top_p=config.top_p,
        subsets=subsets,
        overall=summarize("all", everything, config.k),
    )


def write_report(report: EvalReport, out_dir: Path) -> tuple[Path, Path]:
    """`eval.json` and `eval.png` (Mean@k and Pass@k bars per subset) in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "eval.json", out_dir / "eval.png"
    json_path.write_text(report.model_dump_json(indent=2))
    names = [s.subset for s in report.subsets]
    positions = range(len(names))
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.6))
    width = 0.38
    axes.bar(
        [x - width / 2 for x in positions],
        [s.mean_at_k for s in report.subsets],
        width,
        label=f"Mean@{report.k}",
    )
    axes.bar(
        [x + width / 2 for x in positions],
        [s.pass_at[report.k] for s in report.subsets],
        width,
        label=f"Pass@{report.k}",
    )
    axes.set_xticks(list(positions), names)
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title(
        f"{report.task}: {Path(report.model).name or report.model} "
        f"(T={report.temperature}, top-p={report.top_p})"
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return json_path, png_path


def print_table(report: EvalReport) -> None:
    header = [
        "subset",
        "problems",
        f"Mean@{report.k}",
        *(f"Pass@{j}" for j in report.overall.pass_at),
        "format",
        "reward",
        "tokens",
    ]
    rows = [
        [
            row.subset,
            str(row.problems),
            f"{row.mean_at_k:.3f}",
            *(f"{v:.3f}" for v in row.pass_at.values()),
            f"{row.format_rate:.2f}",
            f"{row.mean_reward:+.2f}",
            f"{row.mean_tokens:.0f}",
        ]
        for row in [*report.subsets, report.overall]
    ]
    print_rows(f"{report.task} — {report.model} (k={report.k})", header, rows)


def print_rows(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table: the first column (names) left-aligned, the figures right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 120)  # no truncated columns in logs and pipes
    console.print(table)
