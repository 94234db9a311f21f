"""The paper's comparison in miniature: GRPO vs KDRL vs RLAD (TRRD) through the real pipeline.

Every arm starts from the same student (`configs/tiny-cpu.yaml`'s bootstrapped pair) and
gets the same budget (steps × B prompts × G samples); it runs as `rlad up` does (embedded
Redis, vLLM rollout and teacher servers, scorer, rollout worker, DeepSpeed trainer). When
the trainer is done the worker stops and the final policy, already loaded in the rollout
server, is evaluated there on the held-out set: Mean@k per subset. The teacher and the
student init are evaluated with `rlad eval`. Reported: mean ± std over seeds, the α ablation
of TRRD (paper Appendix A), reward curves (PNG) and `compare.json`. Finished arms are kept
in `OUT/arms/` with what they ran (the resolved config, the eval settings and the
revisions of both models) and not run again while those stay the same (pass --fresh to
redo them anyway). Teacher and init evaluations are cached the same way.

    python bench/compare.py --seeds 3    # the config's steps; about 2 minutes an arm on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from transformers import AutoTokenizer

from services.clients.rollout import RolloutClient
from services.common.model_files import resolve_model_dir, weights_revision
from services.config.algorithm import switch_algorithm
from services.config.run import RunConfig
from services.evaluation.evaluate import EvalConfig, EvalReport, evaluate, print_rows
from services.launch.plots import running_mean
from services.launch.up import pipeline
from services.tasks import load_task
from trainer.metrics_sink import read_metrics

ALGORITHMS: dict[str, dict[str, Any]] = {  # arm name -> overrides of the base config
    "GRPO": {"algorithm": {"name": "grpo"}, "scorer": {"mode": "passthrough"}},
    "KDRL": {"algorithm": {"name": "kdrl"}},
    "RLAD": {"algorithm": {"name": "trrd", "alpha": 0.5}},
}
WINDOW = 10  # steps in the running mean of the reward curves
PAPER_TABLE_1 = {"GRPO": 0.76, "KDRL": 0.92, "RLAD": 0.94}  # Qwen3-0.6B, 8K, K&K average


class ArmResult(BaseModel):
    settings: str  # `settings_key` of what ran
    name: str
    seed: int
    accuracy: dict[str, float]  # Mean@k per subset and "all"
    rewards: list[float]  # training reward per step
    seconds: float


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def accuracy_of(report: EvalReport) -> dict[str, float]:
    return {**{s.subset: s.mean_at_k for s in report.subsets}, "all": report.overall.mean_at_k}


async def evaluate_served(run: RunConfig, rollout_url: str, eval_config: EvalConfig) -> EvalReport:
    tokenizer = AutoTokenizer.from_pretrained(run.student)
    async with RolloutClient(rollout_url) as client:
        return await evaluate(client, tokenizer, load_task(run.task), eval_config, run.name)


def settings_key(eval_config: EvalConfig, models: list[str], run: RunConfig | None = None) -> str:
    """Changes with anything that changes a result: the run, the eval, the models' weights."""
    settings = {
        "run": run.model_dump(mode="json", exclude={"run_dir"}) if run else None,
        "eval": eval_config.model_dump(mode="json"),
        "models": [weights_revision(resolve_model_dir(model)) for model in models],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def arm_config(base: dict[str, Any], changes: dict[str, Any], name: str, seed: int) -> RunConfig:
    seeded = {"trainer": {"seed": seed}, "rollout": {"seed": seed}, "name": f"{name}-s{seed}"}
    config = merged(merged(base, changes), seeded)
    # The base's block may be another algorithm's (TRRD's alpha): keep what this arm's shares.
    config["algorithm"] = switch_algorithm(config["algorithm"], config["algorithm"]["name"])
    return RunConfig.model_validate(config)


def run_arm(
    run: RunConfig, name: str, seed: int, eval_config: EvalConfig, settings: str
) -> ArmResult:
    started = time.monotonic()
    with pipeline(run) as running:
        while running.trainer.alive():
            running.stack.check()
            time.sleep(1.0)
        if running.trainer.wait() != 0:
            raise RuntimeError(f"{run.name}: trainer failed:\n{running.trainer.tail()}")
        for proc in running.stack.processes:
            if proc.name == "rollout-worker":
                proc.stop()  # the rollout server now serves the final policy to the eval only
        report = asyncio.run(evaluate_served(run, running.rollout_url, eval_config))
    rows = read_metrics(run.folder / "metrics.jsonl")
    return ArmResult(
        settings=settings,
        name=name,
        seed=seed,
        accuracy=accuracy_of(report),
        rewards=[row["reward_mean"] for row in rows],
        seconds=round(time.monotonic() - started, 1),
    )


def eval_model(model: str, config_path: Path, eval_config: EvalConfig, out: Path) -> dict[str, Any]:
    """`rlad eval` in its own process (the in-process vLLM engine stays out of this one)."""
    report_path, key_path = out / "eval.json", out / "settings"
    key = settings_key(eval_config, [model])
    if not report_path.exists() or not key_path.exists() or key_path.read_text() != key:
        flags = {
            "--model": model,
            "--config": config_path,
            "--k": eval_config.k,
            "--temperature": eval_config.temperature,
            "--max-tokens": eval_config.max_tokens,
            "--limit": eval_config.limit_per_subset,
            "--out": out,
        }
        command = [sys.executable, "-m", "services.cli.main", "eval"]
        subprocess.run(command + [str(x) for item in flags.items() for x in item], check=True)
        key_path.write_text(key)
    return accuracy_of(EvalReport.model_validate_json(report_path.read_text()))


def cached_arm(
    folder: Path,
    base: dict[str, Any],
    changes: dict[str, Any],
    name: str,
    seed: int,
    eval_config: EvalConfig,
) -> ArmResult:
    path = folder / "arms" / f"{name}-s{seed}.json"
    run = arm_config(base, changes, name, seed)
    key = settings_key(eval_config, [m for m in (run.student, run.teacher) if m], run)
    if path.exists():
        done = ArmResult.model_validate_json(path.read_text())
        if done.settings == key:
            return done
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} ...", flush=True)
    result = run_arm(run, name, seed, eval_config, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=2))
    print(f"  {name} seed {seed}: {result.accuracy}  ({result.seconds:.0f} s)", flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(
    arms: dict[str, list[ArmResult]], references: dict[str, dict[str, float]]
) -> tuple[list[str], list[list[str]]]:
    """Held-out accuracy per subset, and the training reward over the first and the last
    `WINDOW` steps; mean ± std over seeds."""
    subsets = sorted({s for rows in arms.values() for r in rows for s in r.accuracy} - {"all"})
    header = ["", *subsets, "all", f"reward, first {WINDOW}", f"reward, last {WINDOW}", "seeds"]
    table = [
        [name, *(f"{acc[s]:.3f}" for s in [*subsets, "all"]), "-", "-", "-"]
        for name, acc in references.items()
    ]
    for name, results in arms.items():
        columns = [[r.accuracy[subset] for r in results] for subset in [*subsets, "all"]]
        cells = ["{:.3f} ± {:.3f}".format(*mean_std(values)) for values in columns]
        for window in (slice(None, WINDOW), slice(-WINDOW, None)):
            rewards = [statistics.fmean(r.rewards[window]) for r in results]
            cells.append("{:+.2f} ± {:.2f}".format(*mean_std(rewards)))
        table.append([name, *cells, str(len(results))])
    return header, table


def plot_rewards(arms: dict[str, list[ArmResult]], path: Path) -> None:
    """Training reward per step, as a running mean over `WINDOW` steps (one batch is noisy):
    the mean over seeds, shaded between the seeds' extremes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, results in arms.items():
        length = min(len(r.rewards) for r in results)
        smoothed = [running_mean(r.rewards[:length], WINDOW) for r in results]
        per_step = [[curve[i] for curve in smoothed] for i in range(length)]
        steps = range(1, length + 1)
        axes.plot(steps, [statistics.fmean(v) for v in per_step], label=name)
        axes.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    axes.set_xlabel("step")
    axes.set_ylabel(f"training reward, mean of {WINDOW} steps")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per algorithm.")
    parser.add_argument(
        "--steps", type=int, default=None, help="Trainer steps per arm (default: the config's)."
    )
    parser.add_argument("--alphas", default="0.1,0.3,0.5,0.7,0.9", help="TRRD α ablation.")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="Seeds per ablation α.")
    parser.add_argument("--k", type=int, default=4, help="Samples per held-out problem.")
    parser.add_argument("--limit", type=int, default=50, help="Held-out problems per subset.")
    parser.add_argument("--fresh", action="store_true", help="Forget finished arms first.")
    args = parser.parse_args()

    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(args.config.read_text())
    base["run_dir"] = str(args.out / "runs")
    steps = args.steps or base["trainer"]["steps"]
    base["trainer"].update(steps=steps, checkpoint_every=steps)
    eval_config = EvalConfig(
        k=args.k, max_tokens=base["rollout"]["max_tokens"], limit_per_subset=args.limit
    )
    print(
        f"compare: {args.seeds} seeds × {list(ALGORITHMS)}, {steps} steps of "
        f"B={base['trainer']['batch_prompts']} × G={base['rollout']['group_size']}; eval "
        f"Mean@{args.k} on {args.limit} held-out problems per subset, T={eval_config.temperature}"
    )

    references = {
        "teacher": eval_model(base["teacher"], args.config, eval_config, args.out / "teacher"),
        "student init": eval_model(base["student"], args.config, eval_config, args.out / "init"),
    }
    arms = {
        name: [
            cached_arm(args.out, base, changes, name, seed, eval_config)
            for seed in range(args.seeds)
        ]
        for name, changes in ALGORITHMS.items()
    }
    ablation = {}
    for alpha in [float(a) for a in args.alphas.split(",")]:
        changes = {"algorithm": {"name": "trrd", "alpha": alpha}}
        name = "RLAD" if alpha == 0.5 else f"RLAD-a{alpha}"
        ablation[f"α={alpha}"] = [
            cached_arm(args.out, base, changes, name, seed, eval_config)
            for seed in range(args.ablation_seeds)
        ]

    header, rows = summary_rows(arms, references)
    for row in rows:
        if row[0] in PAPER_TABLE_1:
            row.append(f"{PAPER_TABLE_1[row[0]]:.2f}")
    print_rows(f"held-out Mean@{args.k}", [*header, "paper Table 1"], rows)
    ablation_header, ablation_rows = summary_rows(ablation, {})
    print_rows("TRRD α ablation", ablation_header, ablation_rows)
    plot_rewards(arms, args.out / "reward_curves.png")
    plot_rewards(ablation, args.out / "alpha_ablation.png")
    (args.out / "compare.json").write_text(
        json.dumps(
            {
                "references": references,
                "arms": {n: [r.model_dump() for r in rs] for n, rs in arms.items()},
                "ablation": {n: [r.model_dump() for r in rs] for n, rs in ablation.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {args.out / 'compare.json'}, reward_curves.png and alpha_ablation.png")

    def overall(name: str) -> float:
        return statistics.fmean(r.accuracy["all"] for r in arms[name])

    print(f"rlad_minus_grpo_accuracy: {overall('RLAD') - overall('GRPO'):+.3f}")
    print(f"rlad_minus_kdrl_accuracy: {overall('RLAD') - overall('KDRL'):+.3f}")


if __name__ == "__main__":
    main()
