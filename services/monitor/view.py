"""The terminal view of `rlad monitor`: a `QueueSnapshot` as rich tables, refreshed live.

rlad monitor --redis-url redis://127.0.0.1:6379/0      # live, every 2 s
rlad monitor --once                                    # one reading, as tables
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from services.monitor.snapshot import QueueSnapshot, read_snapshot, with_rates
from services.queue.queues import QueueReader

BAR_WIDTH = 30


def render(snapshot: QueueSnapshot) -> Group:
    return Group(_queue_table(snapshot), _flow_table(snapshot), _trainer_table(snapshot))


def _queue_table(snapshot: QueueSnapshot) -> Table:
    when = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    table = Table(
        title=f"run {snapshot.run}: queue at {when} — backlog {snapshot.backlog}",
        title_justify="left",
    )
    for column in ("stream", "length", "group", "consumers", "pending", "lag", "oldest"):
        table.add_column(column, justify="left" if column in ("stream", "group") else "right")
    for group in snapshot.groups:
        table.add_row(
            group.stream,
            str(snapshot.streams[group.stream]),
            group.group,
            str(group.consumers),
            str(group.pending),
            str(group.lag),
            _age(group.oldest_age_s),
        )
    for stream, length in snapshot.streams.items():
        if all(g.stream != stream for g in snapshot.groups):
            table.add_row(stream, str(length), "—", "", "", "", "")
    return table


def _flow_table(snapshot: QueueSnapshot) -> Table:
    table = Table(title="groups through each stage", title_justify="left")
    table.add_column("stage")
    table.add_column("total", justify="right")
    table.add_column("per minute", justify="right")
    for name, total in snapshot.counters.items():
        rate = snapshot.rates.get(name) if snapshot.rates else None
        table.add_row(name, str(total), "—" if rate is None else f"{rate * 60:.1f}")
    for pool, total in snapshot.teacher_pools.items():
        table.add_row(f"  scored by pool {pool}", str(total), "")
    latency = snapshot.teacher_latency
    if latency.samples:
        table.add_row(
            "teacher call",
            f"{latency.samples} calls",
            f"p50 {latency.p50_ms:.0f} ms · p99 {latency.p99_ms:.0f} ms",
        )
    for letter in snapshot.recent_dead:
        table.add_row(f"[red]dead {letter.id}[/red]", letter.source, letter.reason[:60])
    return table


def _trainer_table(snapshot: QueueSnapshot) -> Table:
    trainer = snapshot.trainer
    table = Table(title="trainer", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("step", "—" if trainer.step is None else str(trainer.step))
    table.add_row(
        "policy version", "—" if trainer.policy_version is None else str(trainer.policy_version)
    )
    table.add_row("last update", _age(trainer.seconds_since_update) + " ago")
    total = sum(trainer.staleness.values())
    for behind, count in trainer.staleness.items():
        bar = "█" * round(BAR_WIDTH * count / total)
        table.add_row(f"staleness {behind}", f"{bar} {count} ({count / total:.0%})")
    return table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}min"


def run_live(
    reader: QueueReader,
    interval_s: float,
    console: Console,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Refresh until interrupted; rates are taken between consecutive refreshes."""
    previous = read_snapshot(reader)
    with Live(render(previous), console=console, refresh_per_second=4) as live:
        while not should_stop():
            time.sleep(interval_s)
            current = read_snapshot(reader)
            live.update(render(with_rates(previous, current)))
            previous = current
