"""Step metrics the trainer adds to the loss's own: rewards, accuracy, lengths, staleness,
and averaging of per-micro-batch metrics across micro-batches and ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from services.common.protocol import RolloutGroup


def batch_metrics(groups: list[RolloutGroup], version: int, stats: Any) -> dict[str, float]:
    completions = [c for g in groups for c in g.completions]
    if not completions:
        return {"groups": 0.0}
    # Host-side statistics: read back with .item(), they never meet the model.
    rewards = torch.tensor([c.reward for c in completions], device="cpu")
    lengths = torch.tensor([float(len(c.token_ids)) for c in completions], device="cpu")
    verdicts = [c.correct for c in completions if c.correct is not None]
    staleness = torch.tensor([float(version - g.policy_version) for g in groups], device="cpu")
    metrics = {
        "groups": float(len(groups)),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "response_length": lengths.mean().item(),
        "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "staleness_mean": staleness.mean().item(),
        "staleness_max": staleness.max().item(),
        "zero_variance_groups": float(stats.zero_variance_groups),
    }
    if verdicts:
        metrics["accuracy"] = sum(verdicts) / len(verdicts)
    return metrics


class WeightedMeans:
    """Weighted means of per-micro-batch metrics, reduced over ranks: by tokens, or for a
    metric that averages over fewer tokens (`trainer.loss.TEACHER_METRICS`), by those."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}  # key -> [Σ value·weight, Σ weight]

    def add(
        self, metrics: dict[str, float], weight: float, weights: Mapping[str, float] | None = None
    ) -> None:
        """`weights` overrides `weight` for the keys it names. A key of weight 0 (a padding
        micro-batch) adds nothing, but counts: every rank must reduce the same keys (the
        loss returns a fixed set of them)."""
        for key, value in metrics.items():
            entry = self.sums.setdefault(key, [0.0, 0.0])
            w = weight if weights is None else weights.get(key, weight)
            if w > 0:
                entry[0] += float(value) * w
                entry[1] += w

    def result(self, world_size: int, device: torch.device) -> dict[str, float]:
        """Means over every rank's micro-batches (collective); `device`: the process
        group's (NCCL reduces GPU tensors only). A key no token weighs is left out."""
        keys = sorted(self.sums)
        values = torch.tensor(
            [self.sums[k] for k in keys], dtype=torch.float64, device=device
        ).reshape(-1, 2)
        if world_size > 1:
            dist.all_reduce(values)
        return {
            k: (values[i, 0] / values[i, 1]).item() for i, k in enumerate(keys) if values[i, 1] > 0
        }
