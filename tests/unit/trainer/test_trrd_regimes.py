"""The paper's three advantage regimes (section 4.1): how far TRRD lets a token's logprob move
before the clip stops it, depending on the sign of the advantage and on the teacher.

With α = 0.5, c = 1 and the teacher within the clamp, log r = logp − ½·logp_old − ½·logp_T.
Moving logp by δ from logp_old, with the teacher `off` nats above logp_old:
    log r = δ − off/2        (GRPO: log r = δ)
A > 0 (push up) stops at log r = log 1.28 = 0.2469; A < 0 (push down) at log 0.8 = −0.2231.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_reference import algorithm, loss_and_grad

from trainer.loss import LossInputs

OLD = -2.0
STEP = 1e-3
DELTAS = torch.arange(0.0, 1.5, STEP)  # candidate moves of logp away from logp_old


def room(advantage: float, teacher_offset: float | None, name: str = "trrd") -> float:
    """How far logp can move in the advantage's direction before its gradient is clipped
    to zero (0 if the token is clipped where it stands)."""
    direction = 1.0 if advantage > 0 else -1.0
    logp = (OLD + direction * DELTAS).unsqueeze(1)  # one single-token completion per move
    count = len(DELTAS)
    teacher = None if teacher_offset is None else torch.full((count, 1), OLD + teacher_offset)
    inputs = LossInputs(
        trainer_logprobs=logp,
        old_logprobs=torch.full((count, 1), OLD),
        rollout_logprobs=torch.full((count, 1), OLD),
        advantages=torch.full((count,), advantage),
        loss_mask=torch.ones(count, 1),
        teacher_logprobs=teacher,
    )
    _, grad, _ = loss_and_grad(inputs, algorithm(name=name))
    clipped = (grad.squeeze(1) == 0).nonzero()
    return DELTAS[clipped[0, 0]].item() if len(clipped) else math.inf


def test_positive_advantage_moves_further_toward_what_the_teacher_likes() -> None:
    grpo = room(1.0, None, name="grpo")
    likes, dislikes = room(1.0, +0.8), room(1.0, -0.8)
    assert grpo == pytest.approx(math.log(1.28), abs=2 * STEP)
    # Teacher 0.8 nats above: log r = δ − 0.4 → room log 1.28 + 0.4.
    assert likes == pytest.approx(math.log(1.28) + 0.4, abs=2 * STEP)
    # Teacher 0.8 nats below: log r = δ + 0.4 > 0.2469 already at δ = 0: no room at all.
    assert dislikes == 0.0
    assert dislikes < grpo < likes


def test_negative_advantage_pushes_down_further_what_the_teacher_dislikes() -> None:
    grpo = room(-1.0, None, name="grpo")
    dislikes, likes = room(-1.0, -0.8), room(-1.0, +0.8)
    assert grpo == pytest.approx(-math.log(0.8), abs=2 * STEP)
    # Teacher below: log r = −δ + 0.4 → room −log 0.8 + 0.4.
    assert dislikes == pytest.approx(-math.log(0.8) + 0.4, abs=2 * STEP)
    # Teacher above: log r = −δ − 0.4 < −0.2231 at once: a token the teacher likes is kept.
    assert likes == 0.0
    assert likes < grpo < dislikes


def test_teacher_influence_on_the_room_is_bounded_by_the_clamp() -> None:
    # Beyond c the teacher term is fixed at (1 − α)·(±c) = ±0.5 and log r moves at rate
    # α = 0.5 only: log r = 0.5·δ − 0.5, room (log 1.28 + 0.5) / 0.5 — the same for a
    # teacher 5 or 50 nats away: confidence beyond c buys nothing more.
    assert room(1.0, +50.0) == pytest.approx((math.log(1.28) + 0.5) / 0.5, abs=2 * STEP)
    assert room(1.0, +5.0) == room(1.0, +50.0)
    assert room(-1.0, -50.0) == pytest.approx((-math.log(0.8) + 0.5) / 0.5, abs=2 * STEP)
    assert room(-1.0, -5.0) == room(-1.0, -50.0)


@pytest.mark.parametrize("teacher_offset", [+0.8, -0.8])
def test_near_zero_advantage_means_no_imitation(teacher_offset: float) -> None:
    # A ≈ 0: TRRD's gradient is A·(...): no push toward the teacher without an RL signal,
    # unlike KDRL, whose KD term pulls toward the teacher whatever the advantage.
    def grad(advantage: float, name: str) -> float:
        inputs = LossInputs(
            trainer_logprobs=torch.tensor([[OLD]]),
            old_logprobs=torch.tensor([[OLD]]),
            rollout_logprobs=torch.tensor([[OLD]]),
            advantages=torch.tensor([advantage]),
            loss_mask=torch.ones(1, 1),
            teacher_logprobs=torch.tensor([[OLD + teacher_offset]]),
        )
        return loss_and_grad(inputs, algorithm(name=name))[1].item()

    assert grad(0.0, "trrd") == 0.0
    for sign in (1.0, -1.0):  # the gradient is linear in A: it vanishes with it
        assert grad(sign * 1e-4, "trrd") == pytest.approx(1e-4 * grad(sign, "trrd"), abs=1e-9)
    # KDRL (k2): d/dlogp = β·(logp − logp_T) = 5e-3·(−offset): toward the teacher.
    assert grad(0.0, "kdrl") == pytest.approx(5e-3 * -teacher_offset)
