"""Group advantages: hand-worked values, Dr. GRPO, zero-variance groups counted and filtered."""

from __future__ import annotations

import math

import pytest
import torch

from services.config.algorithm import TrrdConfig
from trainer.advantages import group_advantages


def test_grpo_advantages_by_hand() -> None:
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    # A = ±0.5 / (0.57735 + 1e-6) = ±0.866024
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages, stats = group_advantages(rewards, TrrdConfig())
    expected = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * expected)
    assert stats.zero_variance_groups == 0
    assert stats.keep.tolist() == [True]


def test_better_completions_get_larger_advantages() -> None:
    rewards = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    advantages, _ = group_advantages(rewards, TrrdConfig())
    assert advantages.argsort(dim=1).tolist() == rewards.argsort(dim=1).tolist()
    assert advantages.sum().abs().item() < 1e-5  # centred within the group


def test_dr_grpo_drops_the_std() -> None:
    # rewards 2, 0, -0.5: mean 0.5 -> A = 1.5, -0.5, -1.0 exactly
    rewards = torch.tensor([[2.0, 0.0, -0.5]])
    advantages, _ = group_advantages(rewards, TrrdConfig(std_normalize=False))
    torch.testing.assert_close(advantages, torch.tensor([[1.5, -0.5, -1.0]]))


@pytest.mark.parametrize("std_normalize", [True, False])
def test_zero_variance_groups_give_zero_and_are_counted(std_normalize: bool) -> None:
    # 0.1 * 3 is not exactly representable: a mean-then-subtract could leave a residue that
    # 1/(std + 1e-6) would blow up; equal rewards must give exactly 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [-2.0, -2.0, -2.0]])
    config = TrrdConfig(std_normalize=std_normalize)
    advantages, stats = group_advantages(rewards, config)
    assert advantages[0].tolist() == [0.0, 0.0, 0.0]
    assert advantages[2].tolist() == [0.0, 0.0, 0.0]
    assert advantages[1].abs().min().item() > 0.1
    assert stats.zero_variance_groups == 2
    assert stats.keep.tolist() == [True, True, True]


def test_filter_zero_variance_drops_those_groups() -> None:
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    _, stats = group_advantages(rewards, TrrdConfig(filter_zero_variance=True))
    assert stats.zero_variance_groups == 2
    assert stats.keep.tolist() == [False, True, False]


def test_single_completion_groups_carry_no_signal() -> None:
    advantages, stats = group_advantages(torch.tensor([[5.0], [-1.0]]), TrrdConfig())
    assert advantages.tolist() == [[0.0], [0.0]]
    assert stats.zero_variance_groups == 2
