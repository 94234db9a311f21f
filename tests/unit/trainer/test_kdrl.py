"""KDRL: GRPO + β_kd·KD with k1/k2/k3, linear β_kd annealing and reward-guided masking."""

from __future__ import annotations

import pytest
import torch
from loss_reference import loss_and_grad, random_inputs, tokens

from services.config.algorithm import GrpoConfig, KdrlConfig
from trainer.loss import kd_beta


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 5e-3), (250, 4e-3), (500, 3e-3), (1000, 1e-3), (10_000, 1e-3), (-5, 5e-3)],
)
def test_kd_beta_anneals_linearly(step: int, expected: float) -> None:
    # 5e-3 → 1e-3 over 1000 steps: −4e-6 per step, then flat.
    assert kd_beta(step, KdrlConfig()) == pytest.approx(expected)


def test_kd_beta_without_annealing_is_the_end_value() -> None:
    assert kd_beta(0, KdrlConfig(kd_anneal_steps=0)) == 1e-3


@pytest.mark.parametrize(
    ("estimator", "value", "derivative"),
    [
        # d = logp − logp_T = −1 − (−2) = 1
        ("k1", 1.0, 1.0),  # d; derivative 1
        ("k2", 0.5, 1.0),  # d²/2; derivative d
        ("k3", 0.367879, 0.632121),  # e^−d − 1 + d; derivative 1 − e^−d
    ],
)
def test_kd_estimators_by_hand(estimator: str, value: float, derivative: float) -> None:
    # A = 0 leaves only the KD term; step 0: β_kd = 5e-3; one token, token-mean.
    inputs = tokens([-1.0], [-1.0], [0.0], teacher=[-2.0])
    config = KdrlConfig(kd_estimator=estimator)  # type: ignore[arg-type]
    loss, grad, metrics = loss_and_grad(inputs, config)
    assert loss.item() == pytest.approx(5e-3 * value, abs=1e-8)
    assert grad.item() == pytest.approx(5e-3 * derivative, abs=1e-8)
    assert metrics["kd"] == pytest.approx(value, abs=1e-6)
    assert metrics["kd_beta"] == 5e-3


def test_kdrl_is_grpo_plus_the_kd_term() -> None:
    inputs = random_inputs(seed=3)
    grpo_loss, grpo_grad, _ = loss_and_grad(inputs, GrpoConfig())
    kdrl_loss, kdrl_grad, metrics = loss_and_grad(inputs, KdrlConfig(), step=500)
    # k2's derivative is d = logp − logp_T, token-mean weights, β_kd(500) = 3e-3
    mask = inputs.loss_mask
    d = (inputs.trainer_logprobs - inputs.teacher_logprobs).detach()  # type: ignore[operator]
    kd_grad = 3e-3 * d * mask / mask.sum()
    torch.testing.assert_close(kdrl_grad, grpo_grad + kd_grad)
    kd_value = 3e-3 * (0.5 * d**2 * mask).sum() / mask.sum()
    assert kdrl_loss.item() == pytest.approx((grpo_loss + kd_value).item(), rel=1e-6)
    assert metrics["kd_loss"] == pytest.approx(kd_value.item(), rel=1e-5)


def test_reward_guided_masking_skips_kd_on_correct_completions() -> None:
    inputs = random_inputs(seed=4)
    assert inputs.correct is not None
    inputs.correct = torch.tensor([True, False, True, False, True, False])
    config = KdrlConfig(kd_reward_masking=True)
    _, grpo_grad, _ = loss_and_grad(inputs, GrpoConfig())
    _, masked_grad, _ = loss_and_grad(inputs, config)
    _, unmasked_grad, _ = loss_and_grad(inputs, KdrlConfig())
    correct, wrong = inputs.correct, ~inputs.correct
    torch.testing.assert_close(masked_grad[correct], grpo_grad[correct])  # no KD at all
    torch.testing.assert_close(masked_grad[wrong], unmasked_grad[wrong])  # full KD
    assert not torch.allclose(masked_grad[wrong], grpo_grad[wrong])
