"""Where step metrics go: `metrics.jsonl` always, a compact console line, and TensorBoard
or wandb when configured (each imported only when asked for)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

CONSOLE_KEYS = (
    ("reward_mean", "reward", "{:+.3f}"),
    ("accuracy", "acc", "{:.2f}"),
    ("loss", "loss", "{:+.4f}"),
    ("clip_frac_high", "clip+", "{:.3f}"),
    ("teacher_clamp_frac", "clampT", "{:.3f}"),
    ("staleness_mean", "stale", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)


class MetricsSink:
    def __init__(
        self, folder: Path, tensorboard: bool = False, wandb_project: str | None = None
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self.console = Console(stderr=True)
        self.tb: Any = None
        self.wandb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tb"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(folder))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        shown = "  ".join(
            f"{label} {fmt.format(metrics[key])}"
            for key, label, fmt in CONSOLE_KEYS
            if key in metrics
        )
        self.console.print(f"[bold]step {step}[/bold]  {shown}")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
