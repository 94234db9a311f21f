"""Properties over random inputs (hypothesis): finite for extreme logprobs and empty
completions, equal to the autograd reference, invariant to padding and to micro-batching."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import loss_and_grad, reference_loss_and_grad, take_rows

from services.config.algorithm import AlgorithmConfig, GrpoConfig, KdrlConfig, TrrdConfig
from trainer.loss import LossInputs

ROWS, TIME = 3, 4

SHARED = {
    "aggregation": st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    "dual_clip": st.sampled_from([None, 3.0]),
    "tis_cap": st.sampled_from([None, 2.0]),
    "kl_beta": st.sampled_from([0.0, 0.1]),
}
configs = st.one_of(
    st.builds(TrrdConfig, clamp_mode=st.sampled_from(["ratio", "anchor"]), **SHARED),
    st.builds(GrpoConfig, **SHARED),
    st.builds(KdrlConfig, kd_estimator=st.sampled_from(["k1", "k2", "k3"]), **SHARED),
)


def trrd_alpha(config: AlgorithmConfig, alpha: float) -> AlgorithmConfig:
    return config.model_copy(update={"alpha": alpha}) if isinstance(config, TrrdConfig) else config


def grids(low: float, high: float) -> st.SearchStrategy[torch.Tensor]:
    values = st.floats(low, high, allow_nan=False, width=32)
    return st.lists(values, min_size=ROWS * TIME, max_size=ROWS * TIME).map(
        lambda v: torch.tensor(v).reshape(ROWS, TIME)
    )


@st.composite
def loss_inputs(draw: st.DrawFn, low: float, high: float) -> LossInputs:
    lengths = draw(st.lists(st.integers(0, TIME), min_size=ROWS, max_size=ROWS))
    return LossInputs(
        trainer_logprobs=draw(grids(low, high)).requires_grad_(True),
        old_logprobs=draw(grids(low, high)),
        rollout_logprobs=draw(grids(low, high)),
        advantages=torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=ROWS, max_size=ROWS))),
        loss_mask=(torch.arange(TIME) < torch.tensor(lengths).unsqueeze(1)).float(),
        teacher_logprobs=draw(grids(low, high)),
        ref_logprobs=draw(grids(low, high)),
        correct=torch.tensor(draw(st.lists(st.booleans(), min_size=ROWS, max_size=ROWS))),
        entropy=draw(grids(0.0, 10.0)),
    )


EXTREME = st.sampled_from([-1e4, -30.0, -1.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(config=configs, alpha=st.floats(0, 1), inputs=loss_inputs(-1e4, 0.0), corner=EXTREME)
def test_loss_gradient_and_metrics_stay_finite(
    config: AlgorithmConfig, alpha: float, inputs: LossInputs, corner: float
) -> None:
    config = trrd_alpha(config, alpha)
    inputs.old_logprobs[0] = corner  # exact extremes next to the drawn ones
    loss, grad, metrics = loss_and_grad(inputs, config, step=100)
    assert math.isfinite(loss.item())
    assert torch.isfinite(grad).all()
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert grad[inputs.loss_mask == 0].abs().sum().item() == 0.0  # empty rows included


@settings(max_examples=60, deadline=None)
@given(config=configs, alpha=st.floats(0, 1), inputs=loss_inputs(-6.0, 0.0))
def test_equals_the_autograd_reference(
    config: AlgorithmConfig, alpha: float, inputs: LossInputs
) -> None:
    config = trrd_alpha(config, alpha)
    loss, grad, _ = loss_and_grad(inputs, config, step=100)
    expected_loss, expected_grad = reference_loss_and_grad(inputs, config, step=100)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(config=configs, inputs=loss_inputs(-6.0, 0.0), split=st.integers(1, ROWS - 1))
def test_micro_batch_losses_sum_to_the_batch_loss(
    config: AlgorithmConfig, inputs: LossInputs, split: int
) -> None:
    loss, grad, _ = loss_and_grad(inputs, config, step=100)
    totals = {
        "total_tokens": inputs.loss_mask.sum().item(),
        "total_sequences": float(inputs.loss_mask.any(1).sum()),
    }
    parts = [
        loss_and_grad(
            take_rows(inputs, rows),
            config,
            step=100,
            **totals,
        )
        for rows in (slice(0, split), slice(split, ROWS))
    ]
    assert sum(p[0].item() for p in parts) == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), grad, rtol=1e-5, atol=1e-6)
