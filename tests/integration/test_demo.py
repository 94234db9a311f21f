"""`make run`'s job, as a user runs it: `rlad up` on `configs/tiny-cpu.yaml` with the shipped
bootstrapped models, every component real. The README promises a reward that visibly
rises within minutes; this holds it to that."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from services.launch.up import RLAD
from trainer.metrics_sink import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
WINDOW = 10  # steps averaged at each end of the run: one batch's mean reward is noisy


def mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)


def test_the_demo_trains_and_its_reward_rises(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["run_dir"] = str(tmp_path)
    for role in ("student", "teacher"):
        config[role] = str(REPO / config[role])
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(config))

    done = subprocess.run(
        [*RLAD, "up", "--config", str(path), "--no-live"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    folder = tmp_path / config["name"]
    rows = read_metrics(folder / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, config["trainer"]["steps"] + 1))
    first, last = rows[:WINDOW], rows[-WINDOW:]
    rise = mean(last, "reward_mean") - mean(first, "reward_mean")
    assert rise > 0.3, (
        f"mean reward {mean(first, 'reward_mean'):+.2f} -> {mean(last, 'reward_mean'):+.2f}"
    )
    assert mean(last, "accuracy") > mean(first, "accuracy")
    for written in ("curves.png", "config.yaml", "final/model.safetensors"):
        assert (folder / written).exists(), written
    accounts = json.loads((folder / "queue_accounts.json").read_text())
    settled = sum(accounts.get(k, 0) for k in ("trained", "stale", "dead"))
    assert accounts["produced"] == settled + accounts["in_rollouts"] + accounts["in_scored"]
