"""The live view of `rlad up`: training progress and queue state, refreshed every second
(a rich table on a terminal; a plain progress line every 15 s when output is not a TTY)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.config.run import RunConfig
from services.queue.keys import DEAD, ROLLOUTS, SCORED
from services.queue.queues import QueueReader
from trainer.metrics_sink import read_metrics

WINDOW = 10  # steps averaged: one batch's mean reward is noisy
BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """One bar per value (the values averaged into `width` buckets when there are more)."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = [
        sum(chunk) / len(chunk)
        for i in range(buckets)
        if (chunk := values[i * len(values) // buckets : (i + 1) * len(values) // buckets])
    ]
    low, span = min(means), max(means) - min(means)
    if span == 0:
        return BARS[0] * len(means)
    return "".join(BARS[round((m - low) / span * (len(BARS) - 1))] for m in means)


def trend(rows: list[dict[str, Any]], key: str, form: str) -> str:
    """The last step's value, the mean of the last `WINDOW` steps and of the first ones."""
    values = [float(r[key]) for r in rows]
    recent, opening = statistics.fmean(values[-WINDOW:]), statistics.fmean(values[:WINDOW])
    return (
        f"{form.format(values[-1])}  · last {WINDOW}: {form.format(recent)}"
        f"  · first {WINDOW}: {form.format(opening)}"
    )


class LiveView:
    def __init__(
        self, run: RunConfig, client: redis.Redis, metrics_path: Path, enabled: bool
    ) -> None:
        self.run = run
        self.reader = QueueReader(client, run.name)
        self.metrics_path = metrics_path
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.live: Live | None = None
        self.phase = ""
        self.started = time.monotonic()
        self.last_line = 0.0

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.__exit__(kind, exc, tb)

    def status(self, phase: str) -> None:
        self.phase = phase
        if not self.enabled:
            self.console.print(f"[rlad up] {phase}")
        self.refresh()

    def snapshot(self) -> dict[str, Any]:
        rows = read_metrics(self.metrics_path)
        last = rows[-1] if rows else {}
        stats = self.reader.stats()
        depths = self.reader.stream_lengths()
        return {"rows": rows, "last": last, "stats": stats, "depths": depths}

    def render(self) -> Table:
        snap = self.snapshot()
        rows, last, stats, depths = snap["rows"], snap["last"], snap["stats"], snap["depths"]
        table = Table(title=f"rlad up · {self.run.name} · {self.run.algorithm.name}", min_width=60)
        table.add_column("", style="bold")
        table.add_column("")
        elapsed = time.monotonic() - self.started
        table.add_row("phase", f"{self.phase}  ({elapsed:.0f}s)")
        table.add_row("step", f"{last.get('step', 0)} / {self.run.trainer.steps}")
        if last:
            table.add_row("reward", trend(rows, "reward_mean", "{:+.3f}"))
            table.add_row("", sparkline([r["reward_mean"] for r in rows]))
            if all("accuracy" in r for r in rows):
                table.add_row("accuracy", trend(rows, "accuracy", "{:.2f}"))
            table.add_row(
                "staleness", f"mean {last['staleness_mean']:.2f}, max {last['staleness_max']:.0f}"
            )
            table.add_row("tokens/s", f"{last['tokens_per_s']:.0f}")
        table.add_row(
            "queues",
            f"rollouts {depths[ROLLOUTS]}  scored {depths[SCORED]}  dead {depths[DEAD]}",
        )
        table.add_row(
            "groups",
            "  ".join(
                f"{k} {stats.get(k, 0)}" for k in ("produced", "scored", "trained", "stale", "dead")
            ),
        )
        return table

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())
        elif time.monotonic() - self.last_line > 15:
            self.last_line = time.monotonic()
            snap = self.snapshot()
            last = snap["last"]
            reward = f"reward {trend(snap['rows'], 'reward_mean', '{:+.3f}')} " if last else ""
            self.console.print(
                f"[rlad up] {self.phase}: step {last.get('step', 0)}/{self.run.trainer.steps} "
                f"{reward}queues {snap['depths']} groups {snap['stats']}"
            )
