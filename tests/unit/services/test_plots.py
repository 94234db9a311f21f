"""The run folder's curves: the running mean, and a PNG with the metrics the rows have."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from services.launch.plots import plot_curves, running_mean


def test_running_mean_averages_the_window_ending_at_each_step() -> None:
    assert running_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], window=10) == [2.0, 3.0]
    assert running_mean([], window=3) == []


def test_one_panel_per_metric_that_every_row_has(tmp_path: Path) -> None:
    full = [
        {"step": s, "reward_mean": -1 + s / 10, "accuracy": s / 40, "response_length": 50 + s}
        for s in range(1, 31)
    ]
    reward_only = [{"step": r["step"], "reward_mean": r["reward_mean"]} for r in full]
    wide = plot_curves(full, tmp_path / "full.png", title="t")
    narrow = plot_curves(reward_only, tmp_path / "narrow.png", title="t")
    assert wide is not None and narrow is not None
    assert Image.open(wide).width > 2.5 * Image.open(narrow).width  # three panels, then one


def test_no_rows_no_plot(tmp_path: Path) -> None:
    assert plot_curves([], tmp_path / "none.png", title="t") is None
    assert not (tmp_path / "none.png").exists()
