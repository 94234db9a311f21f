"""PNG plots a person would rather look at than read: reward and accuracy per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (("reward_mean", "reward"), ("accuracy", "accuracy"), ("response_length", "tokens"))


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    means = []
    for end in range(1, len(values) + 1):
        recent = values[max(0, end - window) : end]
        means.append(sum(recent) / len(recent))
    return means


def plot_curves(
    rows: list[dict[str, Any]], path: Path, title: str, window: int = 10
) -> Path | None:
    """Reward, accuracy and completion length per training step (each metric when every row
    has it), with the running mean over `window` steps: one batch's mean is noisy."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [(key, label) for key, label in PANELS if all(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        values = [float(r[key]) for r in rows]
        ax.plot(steps, values, marker="o", markersize=2.5, alpha=0.45, label="per step")
        ax.plot(steps, running_mean(values, window), linewidth=2.2, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
