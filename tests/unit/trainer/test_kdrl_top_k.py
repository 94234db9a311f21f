"""KDRL's `topk` estimator: the forward KL over the teacher's top-k ids, worked out by hand,
against the plain autograd reference (value and both gradients), through the logits, at
its limit k = vocabulary (the exact forward KL), and TRRD left exactly as it was."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from loss_reference import random_inputs, reference_policy_loss, tokens, with_logprobs

from services.common.logprobs import selective_log_softmax
from services.config.algorithm import AlgorithmConfig, KdrlConfig, TrrdConfig
from trainer.loss import LossInputs, policy_loss

TOP_K = KdrlConfig(kd_estimator="topk")


def with_top_k(inputs: LossInputs, k: int = 4, vocab: int = 16, seed: int = 0) -> LossInputs:
    """`inputs` plus a teacher's top-k (full-vocabulary logprobs of its k best ids, best
    first) and the trainer's logprobs at those ids, from random distributions."""
    gen = torch.Generator().manual_seed(seed)
    rows, steps = inputs.loss_mask.shape
    teacher = torch.log_softmax(2.0 * torch.randn(rows, steps, vocab, generator=gen), dim=-1)
    student = torch.log_softmax(torch.randn(rows, steps, vocab, generator=gen), dim=-1)
    teacher_top_k, ids = teacher.topk(k, dim=-1)
    return dataclasses.replace(
        inputs,
        teacher_top_k_logprobs=teacher_top_k,
        trainer_top_k_logprobs=student.gather(-1, ids),
    )


def grads(
    inputs: LossInputs, config: AlgorithmConfig, reference: bool = False, **totals: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The loss, its gradients in trainer_logprobs and trainer_top_k_logprobs, and metrics."""
    inputs = with_logprobs(inputs, inputs.trainer_logprobs)
    assert inputs.trainer_top_k_logprobs is not None
    top_k = inputs.trainer_top_k_logprobs.detach().clone().requires_grad_()
    inputs = dataclasses.replace(inputs, trainer_top_k_logprobs=top_k)
    if reference:
        loss, metrics = reference_policy_loss(inputs, config, **totals), {}
    else:
        loss, metrics = policy_loss(inputs, config, 0, **totals)
    grad, top_k_grad = torch.autograd.grad(
        loss, [inputs.trainer_logprobs, top_k], allow_unused=True
    )
    return loss.detach(), grad, top_k_grad, metrics


def test_top_k_forward_kl_by_hand() -> None:
    # One token, k = 2, A = 0 (only the KD term), β_kd(0) = 5e-3, token-mean over 1 token.
    # p_T = (0.6, 0.3), π_θ = (0.5, 0.25) at those ids:
    # KD = 0.6·ln(0.6/0.5) + 0.3·ln(0.3/0.25) = 0.9·ln 1.2 = 0.164089
    # d KD / d log π_θ(v) = −p_T(v) = (−0.6, −0.3); nothing reaches the sampled token's logp.
    inputs = tokens(
        [-1.0],
        [-1.0],
        [0.0],
        teacher=[-2.0],
        teacher_top_k_logprobs=torch.tensor([[[math.log(0.6), math.log(0.3)]]]),
        trainer_top_k_logprobs=torch.tensor([[[math.log(0.5), math.log(0.25)]]]),
    )
    loss, grad, top_k_grad, metrics = grads(inputs, TOP_K)
    assert loss.item() == pytest.approx(5e-3 * 0.9 * math.log(1.2), abs=1e-8)
    assert metrics["kd"] == pytest.approx(0.164089, abs=1e-6)
    assert grad.item() == 0.0
    assert top_k_grad is not None
    torch.testing.assert_close(top_k_grad, torch.tensor([[[-5e-3 * 0.6, -5e-3 * 0.3]]]))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("masking", [False, True])
def test_top_k_loss_and_gradients_match_the_reference(aggregation: str, masking: bool) -> None:
    config = KdrlConfig(
        kd_estimator="topk", aggregation=aggregation, kd_reward_masking=masking, kl_beta=0.1
    )
    inputs = with_top_k(random_inputs(seed=5), seed=5)
    inputs.correct = torch.tensor([True, False, True, False, True, False])
    loss, grad, top_k_grad, metrics = grads(inputs, config, total_tokens=40.0)
    expected_loss, expected_grad, expected_top_k_grad, _ = grads(
        inputs, config, reference=True, total_tokens=40.0
    )
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(top_k_grad, expected_top_k_grad)
    assert metrics["kd_loss"] != 0.0


def test_the_gradient_reaches_the_logits_as_the_exact_forward_kl_when_k_is_the_vocabulary() -> None:
    """k = V: the estimator is KL(p_T ‖ π_θ) itself, and through the gather of
    `selective_log_softmax` its gradient in the student's logits z is β·w·(softmax(z) − p_T)."""
    vocab, temperature = 12, 0.7
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, vocab, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.log_softmax(torch.randn(2, 3, vocab, generator=gen), dim=-1)
    teacher_top_k, ids = teacher.topk(vocab, dim=-1)
    student_top_k = selective_log_softmax(logits, ids, temperature, chunk_elements=vocab)
    zeros = torch.zeros(2, 3)
    inputs = LossInputs(
        trainer_logprobs=zeros.clone().requires_grad_(),
        old_logprobs=zeros,
        rollout_logprobs=zeros,
        advantages=torch.zeros(2),
        loss_mask=torch.ones(2, 3),
        teacher_logprobs=zeros,
        teacher_top_k_logprobs=teacher_top_k,
        trainer_top_k_logprobs=student_top_k,
    )
    config = KdrlConfig(kd_estimator="topk", kd_anneal_steps=0, kd_beta_end=0.5)
    loss, metrics = policy_loss(inputs, config, step=0)
    (grad_logits,) = torch.autograd.grad(loss, logits)
    student = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
    exact_kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none")
    assert metrics["kd"] == pytest.approx(exact_kl.sum(-1).mean().item(), rel=1e-5)
    # d/dz of 0.5·mean_t KL = 0.5/6·(softmax(z/T) − p_T)/T
    expected = 0.5 / 6 * (student.exp() - teacher.exp()) / temperature
    torch.testing.assert_close(grad_logits.float(), expected, atol=1e-6, rtol=1e-5)


def test_rows_without_a_teacher_and_padding_take_no_top_k_term() -> None:
    inputs = with_top_k(random_inputs(seed=6), seed=6)
    assert inputs.teacher_top_k_logprobs is not None
    has = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    padding = (inputs.loss_mask == 0).unsqueeze(2)
    noisy = dataclasses.replace(
        inputs,
        has_teacher=has,
        teacher_top_k_logprobs=torch.where(padding, -1e4, inputs.teacher_top_k_logprobs),
    )
    _, _, top_k_grad, _ = grads(noisy, TOP_K)
    assert top_k_grad is not None
    assert top_k_grad[~has.bool()].abs().max() == 0.0
    assert top_k_grad.masked_select(padding).abs().max() == 0.0
    scored = has.bool()
    assert top_k_grad[scored].abs().max() > 0.0


def test_top_k_inputs_are_required_and_trrd_ignores_them() -> None:
    inputs = random_inputs(seed=7)
    with pytest.raises(ValueError, match="topk needs teacher_top_k_logprobs"):
        policy_loss(with_logprobs(inputs, inputs.trainer_logprobs), TOP_K, step=0)
    # TRRD reads no top-k: its loss and gradient are bit for bit those without it.
    with_k = with_top_k(inputs, seed=7)
    loss, grad, top_k_grad, _ = grads(with_k, TrrdConfig())
    plain = with_logprobs(inputs, inputs.trainer_logprobs)
    plain_loss, _ = policy_loss(plain, TrrdConfig(), step=0)
    (plain_grad,) = torch.autograd.grad(plain_loss, plain.trainer_logprobs)
    assert loss.item() == plain_loss.item() and torch.equal(grad, plain_grad)
    assert top_k_grad is None
