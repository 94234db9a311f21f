"""Group-relative advantages (GRPO): each completion's reward against its prompt's group.

`A_i = (R_i - mean_G R) / (std_G R + 1e-6)`, or without the std (Dr. GRPO). A group whose
rewards are all equal teaches nothing: its advantages are exactly 0, it is counted, and it
can be dropped ("dynamic sampling") so that it takes no room in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.config.algorithm import AlgorithmConfig

STD_EPS = 1e-6


@dataclass(frozen=True)
class AdvantageStats:
    zero_variance_groups: int  # groups whose G rewards are all equal
    keep: torch.Tensor  # [num_groups] bool; all True unless config.filter_zero_variance


def group_advantages(
    rewards: torch.Tensor,  # [num_groups, G]
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, AdvantageStats]:  # advantages [num_groups, G] float32
    """Advantages of every completion, the same for each of its tokens.

    The std is the unbiased sample std of the group (G - 1 in the denominator), as in
    GRPO implementations. Equality is tested exactly, not through the std, so that a group
    of identical float rewards gives 0 and never a rounding residue divided by 1e-6.
    """
    rewards = rewards.to(torch.float32)
    num_groups, group_size = rewards.shape
    zero_variance = (rewards == rewards[:, :1]).all(dim=1)  # [num_groups]
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [num_groups, G]
    if config.std_normalize:
        dof = max(group_size - 1, 1)  # G = 1 is always a zero-variance group
        std = (centred.square().sum(dim=1, keepdim=True) / dof).sqrt()  # [num_groups, 1]
        centred = centred / (std + STD_EPS)
    advantages = centred.masked_fill(zero_variance.unsqueeze(1), 0.0)
    keep = (
        ~zero_variance
        if config.filter_zero_variance
        else torch.ones(num_groups, dtype=torch.bool, device=rewards.device)
    )
    return advantages, AdvantageStats(int(zero_variance.sum().item()), keep)
