"""TRRD / GRPO surrogate: values worked out by hand, α = 1 is GRPO, the fast path equals the
plain autograd transcription of docs/design.md#the-math, padding and micro-batching are exact."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from loss_reference import (
    algorithm,
    loss_and_grad,
    random_inputs,
    reference_loss_and_grad,
    take_rows,
    tokens,
)

from services.config.algorithm import AlgorithmConfig, GrpoConfig, KdrlConfig, TrrdConfig
from trainer.loss import LossInputs, policy_loss


def test_trrd_ratio_mode_by_hand() -> None:
    # α = 0.25 (weight of the OLD policy), c = 1, token-mean over 2 tokens.
    # token 1: logp − old = 0.2, logp − T = −0.5 (inside ±c), A = +1
    #   log r = 0.25·0.2 + 0.75·(−0.5) = −0.325, r = 0.722527 < 1.28: loss −0.722527,
    #   d/dlogp = −A·r·1 = −0.722527.  (α swapped, 0.75·0.2 + 0.25·(−0.5) = 0.025: r = 1.0253)
    # token 2: logp − old = 0.1, logp − T = 2.5 → clamped to 1, A = −1
    #   log r = 0.25·0.1 + 0.75·1 = 0.775, r = 2.170592 > 0.8: loss +2.170592,
    #   d/dlogp = −A·r·α = 0.542648 (the clamped term is constant: slope α only).
    inputs = tokens([-1.0, -1.0], [-1.2, -1.1], [1.0, -1.0], teacher=[-0.5, -3.5])
    loss, grad, metrics = loss_and_grad(inputs, TrrdConfig(alpha=0.25))
    assert loss.item() == pytest.approx((-0.722527 + 2.170592) / 2, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[-0.722527], [0.542648]]) / 2)
    assert metrics["ratio_mean"] == pytest.approx((0.722527 + 2.170592) / 2, abs=1e-5)
    assert metrics["teacher_clamp_frac"] == 0.5
    assert metrics["teacher_logprob_gap"] == pytest.approx((-0.5 + 2.5) / 2)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
    assert metrics["loss"] == pytest.approx(loss.item())


def test_anchor_mode_by_hand() -> None:
    # logp = −1, old = −1.2, T = −4, A = −1, α = 0.25, c = 1.
    # anchor: log r = 0.2 + 0.75·clamp(old − T = 2.8) = 0.95, r = 2.585710, slope 1.
    # ratio:  log r = 0.25·0.2 + 0.75·clamp(logp − T = 3) = 0.8, r = 2.225541, slope 0.25.
    inputs = tokens([-1.0], [-1.2], [-1.0], teacher=[-4.0])
    anchor = loss_and_grad(inputs, TrrdConfig(alpha=0.25, clamp_mode="anchor"))
    ratio = loss_and_grad(inputs, TrrdConfig(alpha=0.25, clamp_mode="ratio"))
    assert anchor[0].item() == pytest.approx(2.585710, abs=1e-5)
    assert anchor[1].item() == pytest.approx(2.585710, abs=1e-5)
    assert ratio[0].item() == pytest.approx(2.225541, abs=1e-5)
    assert ratio[1].item() == pytest.approx(0.25 * 2.225541, abs=1e-5)
    assert anchor[2]["teacher_clamp_frac"] == ratio[2]["teacher_clamp_frac"] == 1.0


def test_grpo_by_hand() -> None:
    # old = −1.5 everywhere, token-mean over 3 tokens.
    # A = +2: r = e^0.5 = 1.648721 > 1.28 → loss −2·1.28 = −2.56, no gradient (clip high)
    # A = −1: r = e^−0.5 = 0.606531 < 0.8 → loss +0.8, no gradient (clip low)
    # A = −1: r = e^0.1 = 1.105171 → loss +1.105171, d/dlogp = −A·r = 1.105171
    inputs = tokens([-1.0, -2.0, -1.4], [-1.5] * 3, [2.0, -1.0, -1.0])
    loss, grad, metrics = loss_and_grad(inputs, GrpoConfig())
    assert loss.item() == pytest.approx((-2.56 + 0.8 + 1.105171) / 3, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.0], [1.105171 / 3]]))
    assert metrics["clip_frac_high"] == metrics["clip_frac_low"] == pytest.approx(1 / 3)
    assert metrics["ratio_mean"] == pytest.approx((1.648721 + 0.606531 + 1.105171) / 3, abs=1e-5)


def test_alpha_zero_anchors_the_ratio_on_the_teacher() -> None:
    # α = 0: r = π_θ / π_T whatever π_old: logp − T = 0.1 → r = e^0.1, loss −A·r for A = 1.
    inputs = tokens([-1.0], [-5.0], [1.0], teacher=[-1.1])
    loss, grad, _ = loss_and_grad(inputs, TrrdConfig(alpha=0.0))
    assert loss.item() == pytest.approx(-math.exp(0.1), abs=1e-6)
    assert grad.item() == pytest.approx(-math.exp(0.1), abs=1e-6)


@pytest.mark.parametrize("clamp_mode", ["ratio", "anchor"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_trrd_with_alpha_one_is_grpo(clamp_mode: str, aggregation: str) -> None:
    inputs = random_inputs(spread=3.0)  # a teacher far enough to hit the clamp often
    trrd = TrrdConfig(alpha=1.0, clamp_mode=clamp_mode, aggregation=aggregation)
    grpo = GrpoConfig(aggregation=aggregation)
    trrd_loss, trrd_grad, metrics = loss_and_grad(inputs, trrd)
    grpo_loss, grpo_grad, _ = loss_and_grad(inputs, grpo)
    assert metrics["teacher_clamp_frac"] > 0.2  # the teacher term was there, with weight 0
    torch.testing.assert_close(trrd_loss, grpo_loss, rtol=0, atol=1e-7)
    torch.testing.assert_close(trrd_grad, grpo_grad, rtol=0, atol=1e-7)
    assert not torch.equal(loss_and_grad(inputs, TrrdConfig())[1], grpo_grad)


CONFIGS = [
    {},
    {"alpha": 0.0},
    {"alpha": 0.8, "teacher_clamp": 0.3},
    {"clamp_mode": "anchor", "alpha": 0.3},
    {"aggregation": "seq-mean-token-mean", "dual_clip": 3.0},
    {"aggregation": "seq-mean-token-sum", "tis_cap": 2.0},
    {"kl_beta": 0.1, "eps_low": 0.1, "eps_high": 0.1},
    {"name": "grpo", "dual_clip": 1.5, "tis_cap": 1.2, "kl_beta": 0.05},
    {"name": "kdrl"},
    {"name": "kdrl", "kd_estimator": "k1", "kd_reward_masking": True},
    {"name": "kdrl", "kd_estimator": "k3", "aggregation": "seq-mean-token-mean"},
]


@pytest.mark.parametrize(
    "fields", CONFIGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())
)
def test_fast_path_equals_plain_autograd(fields: dict[str, object]) -> None:
    config = algorithm(**fields)
    for seed in range(3):
        inputs = random_inputs(seed=seed, spread=1.5)
        if config.kl_beta == 0:
            inputs.ref_logprobs = None
        loss, grad, _ = loss_and_grad(inputs, config, step=250)
        expected_loss, expected_grad = reference_loss_and_grad(inputs, config, step=250)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clamp_mode", ["ratio", "anchor"])
def test_teacher_clamp_engages_exactly_beyond_c(clamp_mode: str) -> None:
    # α = 0.5, c = 1, wide PPO clip so that only the teacher clamp acts; logp = old, so
    # log r = 0.5·clamp(gap) with gap = logp − T (ratio) or old − T (anchor).
    gaps = [0.999, 1.0, 1.001, 3.0, -0.999, -1.0, -1.001, -3.0]
    inputs = tokens([-2.0] * 8, [-2.0] * 8, [1.0] * 8, teacher=[-2.0 - g for g in gaps])
    config = TrrdConfig(clamp_mode=clamp_mode, eps_low=0.9, eps_high=1.0)
    loss, grad, metrics = loss_and_grad(inputs, config)
    clamped = [max(-1.0, min(1.0, g)) for g in gaps]
    ratios = torch.tensor([math.exp(0.5 * g) for g in clamped])
    # ratio mode: slope 1 inside [−c, c] (torch.clamp passes the gradient at exactly ±c),
    # α = 0.5 beyond; anchor mode: slope 1 everywhere.
    slopes = torch.tensor([1.0 if abs(g) <= 1.0 or clamp_mode == "anchor" else 0.5 for g in gaps])
    assert loss.item() == pytest.approx(-ratios.mean().item(), abs=1e-6)
    torch.testing.assert_close(grad.squeeze(1), -ratios * slopes / 8)
    assert metrics["teacher_clamp_frac"] == 4 / 8  # ±1.001 and ±3


def test_padding_tokens_contribute_nothing() -> None:
    inputs = random_inputs(seed=1)
    padding = inputs.loss_mask == 0
    garbage = torch.where(torch.rand(padding.shape) > 0.5, -1e4, 0.0)
    noisy = LossInputs(
        **{
            name: torch.where(padding, garbage, value)
            if name.endswith("probs") and value is not None
            else value
            for name, value in vars(inputs).items()
        }
    )
    noisy.entropy = torch.where(padding, 1e4, inputs.entropy)
    for config in (TrrdConfig(tis_cap=2.0, kl_beta=0.1), KdrlConfig()):
        loss, grad, metrics = loss_and_grad(inputs, config)
        noisy_loss, noisy_grad, noisy_metrics = loss_and_grad(noisy, config)
        assert noisy_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(noisy_grad, grad)
        assert noisy_grad[padding].abs().max().item() == 0.0
        assert noisy_metrics == pytest.approx(metrics, rel=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_add_up_to_the_global_batch(aggregation: str) -> None:
    config = TrrdConfig(aggregation=aggregation, kl_beta=0.1)
    whole = random_inputs(rows=7, seed=2)
    loss, grad, _ = loss_and_grad(whole, config)
    totals = {
        "total_tokens": whole.loss_mask.sum().item(),
        "total_sequences": float(whole.loss_mask.any(1).sum()),
    }
    parts, weighted_loss_metric = [], 0.0
    for rows in (slice(0, 3), slice(3, 7)):
        part = take_rows(whole, rows)
        part_loss, part_grad, metrics = loss_and_grad(part, config, **totals)
        parts.append((part_loss, part_grad))
        weighted_loss_metric += metrics["loss"] * part.loss_mask.sum().item()
    assert sum(p[0].item() for p in parts) == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), grad)
    # The trainer's token-weighted average of the `loss` metric is the global loss.
    assert weighted_loss_metric / totals["total_tokens"] == pytest.approx(loss.item(), rel=1e-6)


def test_a_micro_batch_without_tokens_gives_zero_and_still_backpropagates() -> None:
    inputs = random_inputs(lengths=[0] * 6)
    loss, metrics = policy_loss(inputs, TrrdConfig(), step=0, total_tokens=10.0)
    loss.backward()
    assert loss.item() == 0.0
    assert inputs.trainer_logprobs.grad is not None
    assert inputs.trainer_logprobs.grad.abs().max().item() == 0.0
    assert all(math.isfinite(value) for value in metrics.values())


def test_dual_clip_caps_negative_advantage_losses() -> None:
    # A = −1, r = e^1.5 = 4.481689: plain PPO loss 4.481689 with gradient 4.481689;
    # dual-clip C = 3: loss min(4.481689, −C·A = 3) = 3, and no gradient.
    inputs = tokens([-1.0], [-2.5], [-1.0])
    plain = loss_and_grad(inputs, GrpoConfig())
    dual = loss_and_grad(inputs, GrpoConfig(dual_clip=3.0))
    assert (plain[0].item(), plain[1].item()) == pytest.approx((4.481689, 4.481689), abs=1e-5)
    assert (dual[0].item(), dual[1].item()) == pytest.approx((3.0, 0.0))
    assert (dual[2]["dual_clip_frac"], dual[2]["clip_frac_low"]) == (1.0, 0.0)


def test_truncated_importance_weight_scales_each_token() -> None:
    # old − rollout = log 3 → weight min(3, cap 2) = 2; r = 1, A = −1 → loss 2·1, grad 2.
    inputs = tokens([-1.0], [-1.0], [-1.0])
    inputs.rollout_logprobs = inputs.old_logprobs - math.log(3.0)
    loss, grad, metrics = loss_and_grad(inputs, GrpoConfig(tis_cap=2.0))
    assert (loss.item(), grad.item()) == pytest.approx((2.0, 2.0))
    assert metrics["is_weight_mean"] == pytest.approx(2.0)


def test_kl_k3_penalty_by_hand() -> None:
    # logp = −1, ref = −2: q = ref − logp = −1, k3 = e^q − q − 1 = 0.367879, d/dlogp = 1 − e^q.
    # A = 0 removes the policy term; β = 0.1.
    inputs = tokens([-1.0], [-1.0], [0.0], ref_logprobs=torch.tensor([[-2.0]]))
    loss, grad, metrics = loss_and_grad(inputs, GrpoConfig(kl_beta=0.1))
    assert loss.item() == pytest.approx(0.1 * 0.367879, abs=1e-6)
    assert grad.item() == pytest.approx(0.1 * 0.632121, abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.367879, abs=1e-6)


def test_inputs_the_config_needs_are_checked() -> None:
    inputs = random_inputs()
    inputs.teacher_logprobs = None
    with pytest.raises(ValueError, match="teacher_logprobs"):
        policy_loss(inputs, TrrdConfig(), step=0)
    inputs = random_inputs()
    inputs.ref_logprobs = None
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(inputs, TrrdConfig(kl_beta=0.1), step=0)
    inputs = random_inputs()
    inputs.correct = None
    with pytest.raises(ValueError, match="correct"):
        policy_loss(inputs, KdrlConfig(kd_reward_masking=True), step=0)


# ---------------------------------------------------------------- rows without a teacher


def without_teacher(inputs: LossInputs, rows: list[bool], garbage: float = -7.0) -> LossInputs:
    """`inputs` where the rows marked False have no teacher: their teacher logprobs are
    whatever (here `garbage`), and `has_teacher` says so."""
    has = torch.tensor(rows, dtype=torch.float32)
    assert inputs.teacher_logprobs is not None
    teacher = torch.where(has.bool().unsqueeze(1), inputs.teacher_logprobs, garbage)
    return dataclasses.replace(inputs, teacher_logprobs=teacher, has_teacher=has)


@pytest.mark.parametrize(
    "config",
    [TrrdConfig(), TrrdConfig(clamp_mode="anchor", alpha=0.2), KdrlConfig(kd_estimator="k3")],
    ids=["trrd-ratio", "trrd-anchor", "kdrl"],
)
def test_a_batch_without_a_teacher_trains_exactly_as_grpo(config: AlgorithmConfig) -> None:
    """Degraded rows (no teacher answered): α = 1, no KD, whatever their teacher values."""
    inputs = random_inputs(seed=3)
    grpo = GrpoConfig(**config.model_dump(include=set(GrpoConfig.model_fields) - {"name"}))
    expected_loss, expected_grad, expected = loss_and_grad(inputs, grpo)
    for garbage in (-7.0, 0.0, -1e4):
        degraded = without_teacher(inputs, [False] * 6, garbage)
        loss, grad, metrics = loss_and_grad(degraded, config)
        assert loss.item() == expected_loss.item()
        assert torch.equal(grad, expected_grad)
        assert metrics["policy_loss"] == expected["policy_loss"]
        assert metrics["ratio_mean"] == expected["ratio_mean"]
        assert metrics.get("kd_loss", 0.0) == 0.0
        assert metrics.get("teacher_clamp_frac", 0.0) == 0.0  # no tokens to clamp


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["trrd", "kdrl"])
def test_a_mixed_batch_equals_each_row_under_its_own_loss(aggregation: str, name: str) -> None:
    """Rows with a teacher keep the configured loss exactly; rows without get GRPO's; the
    batch's loss and gradient are the sum of the two computed apart (global totals)."""
    config = algorithm(name=name, aggregation=aggregation, kl_beta=0.1)
    grpo = algorithm(name="grpo", aggregation=aggregation, kl_beta=0.1)
    rows = [True, False, True, False, False, True]
    inputs = without_teacher(random_inputs(seed=4), rows)
    loss, grad, metrics = loss_and_grad(inputs, config)
    totals = {
        "total_tokens": inputs.loss_mask.sum().item(),
        "total_sequences": float(inputs.loss_mask.any(1).sum()),
    }
    scored, bare = torch.tensor(rows), ~torch.tensor(rows)
    kept = dataclasses.replace(inputs, has_teacher=None)
    with_loss, with_grad, with_metrics = loss_and_grad(take_rows(kept, scored), config, **totals)
    bare_loss, bare_grad, _ = loss_and_grad(take_rows(kept, bare), grpo, **totals)
    assert loss.item() == pytest.approx(with_loss.item() + bare_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad[scored], with_grad)
    torch.testing.assert_close(grad[bare], bare_grad)
    # Teacher metrics are means over the scored rows' tokens alone.
    for key in ("teacher_logprob_gap", "teacher_clamp_frac", "kd"):
        if key in with_metrics:
            assert metrics[key] == pytest.approx(with_metrics[key], rel=1e-5), key
