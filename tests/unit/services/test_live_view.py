"""The live view's summaries of the metrics so far."""

from __future__ import annotations

from services.launch.live_view import BARS, sparkline, trend


def test_sparkline_draws_one_bar_per_value_from_lowest_to_highest() -> None:
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == BARS
    assert sparkline([-1.0, -1.0, -1.0]) == BARS[0] * 3
    assert sparkline([]) == ""


def test_sparkline_averages_long_runs_into_the_width() -> None:
    line = sparkline([float(v // 10) for v in range(100)], width=10)  # ten flat steps
    assert len(line) == 10
    assert line[0] == BARS[0] and line[-1] == BARS[-1]
    assert list(line) == sorted(line)


def test_trend_reports_last_step_and_the_means_at_both_ends() -> None:
    rows = [{"reward_mean": float(step)} for step in range(1, 21)]
    assert trend(rows, "reward_mean", "{:+.1f}") == "+20.0  · last 10: +15.5  · first 10: +5.5"
    assert trend(rows[:3], "reward_mean", "{:.0f}") == "3  · last 10: 2  · first 10: 2"
