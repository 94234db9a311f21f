"""Step metrics the trainer adds to the loss's own: rewards, accuracy, lengths, staleness,
and averaging of per-micro-batch metrics across micro-batches and ranks."""

from __future__ import annotations

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
    """Token-weighted means of per-micro-batch metrics, reduced over ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, float], weight: float) -> None:
        if weight <= 0:
            # A padding micro-batch adds nothing, but its keys count: every rank must reduce
            # the same keys (the loss returns a fixed set of them).
            for key in metrics:
                self.sums.setdefault(key, 0.0)
            return
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.weight += weight

    def result(self, world_size: int, device: torch.device) -> dict[str, float]:
        """Means over every rank's micro-batches (collective); `device`: the process
        group's (NCCL reduces GPU tensors only)."""
        keys = sorted(self.sums)
        values = torch.tensor(
            [self.sums[k] for k in keys] + [self.weight], dtype=torch.float64, device=device
        )
        if world_size > 1:
            dist.all_reduce(values)
        total = values[-1].item()
        if total <= 0:
            return {}
        return {k: (values[i] / total).item() for i, k in enumerate(keys)}
