"""docs/design.md#the-math, transcribed as plainly as possible with autograd: the slow reference
that `trainer.loss.policy_loss` (one no-grad pass plus a precomputed gradient) must match.
Also the helpers the loss tests share."""

from __future__ import annotations

import dataclasses

import torch
from pydantic import TypeAdapter

from services.config.algorithm import AlgorithmConfig, KdrlConfig, TrrdConfig
from trainer.loss import LossInputs, kd_beta, policy_loss


def algorithm(**fields: object) -> AlgorithmConfig:
    """The variant `name` selects (trrd when left out), parsed as a run config's block."""
    return TypeAdapter(AlgorithmConfig).validate_python(fields)


def random_inputs(
    rows: int = 6,
    time_steps: int = 9,
    seed: int = 0,
    spread: float = 1.0,
    lengths: list[int] | None = None,
) -> LossInputs:
    """Plausible logprobs (≤ 0), a trainer near the sampler, a teacher ~`spread` nats away,
    ragged right-padded lengths (one empty row), mixed-sign advantages."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, time_steps)
    logp = -torch.rand(shape, generator=gen) * 3.0
    lengths = lengths or [time_steps - (i * 3) % time_steps for i in range(rows - 1)] + [0]
    return LossInputs(
        trainer_logprobs=logp.requires_grad_(True),
        old_logprobs=logp.detach() + 0.3 * torch.randn(shape, generator=gen),
        rollout_logprobs=logp.detach() + 0.3 * torch.randn(shape, generator=gen),
        advantages=torch.randn(rows, generator=gen),
        loss_mask=(torch.arange(time_steps) < torch.tensor(lengths).unsqueeze(1)).float(),
        teacher_logprobs=logp.detach() + spread * torch.randn(shape, generator=gen),
        ref_logprobs=logp.detach() + 0.2 * torch.randn(shape, generator=gen),
        correct=torch.rand(rows, generator=gen) > 0.5,
        entropy=torch.rand(shape, generator=gen),
    )


def tokens(
    logp: list[float],
    old: list[float],
    advantages: list[float],
    teacher: list[float] | None = None,
    **extra: torch.Tensor,
) -> LossInputs:
    """One single-token completion per entry."""
    column = lambda values: torch.tensor(values).unsqueeze(1)  # noqa: E731
    return LossInputs(
        trainer_logprobs=column(logp).requires_grad_(True),
        old_logprobs=column(old),
        rollout_logprobs=column(old),
        advantages=torch.tensor(advantages),
        loss_mask=torch.ones(len(logp), 1),
        teacher_logprobs=None if teacher is None else column(teacher),
        **extra,
    )


def with_logprobs(inputs: LossInputs, logprobs: torch.Tensor) -> LossInputs:
    """The same inputs around a fresh leaf of trainer logprobs."""
    return dataclasses.replace(inputs, trainer_logprobs=logprobs.detach().clone().requires_grad_())


def take_rows(inputs: LossInputs, rows: slice | torch.Tensor) -> LossInputs:
    """The inputs of some rows only: a micro-batch of a batch."""
    return LossInputs(
        **{name: None if value is None else value[rows] for name, value in vars(inputs).items()}
    )


def loss_and_grad(
    inputs: LossInputs, config: AlgorithmConfig, step: int = 0, **totals: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """policy_loss's value, its gradient in trainer_logprobs, and its metrics."""
    inputs = with_logprobs(inputs, inputs.trainer_logprobs)
    loss, metrics = policy_loss(inputs, config, step, **totals)
    (grad,) = torch.autograd.grad(loss, inputs.trainer_logprobs)
    return loss.detach(), grad, metrics


def reference_loss_and_grad(
    inputs: LossInputs, config: AlgorithmConfig, step: int = 0, **totals: float
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = with_logprobs(inputs, inputs.trainer_logprobs)
    loss = reference_policy_loss(inputs, config, step, **totals)
    (grad,) = torch.autograd.grad(loss, inputs.trainer_logprobs)
    return loss.detach(), grad


def reference_log_ratio(inputs: LossInputs, config: AlgorithmConfig) -> torch.Tensor:
    logp, old = inputs.trainer_logprobs, inputs.old_logprobs
    if not isinstance(config, TrrdConfig):
        return logp - old
    teacher, alpha, c = inputs.teacher_logprobs, config.alpha, config.teacher_clamp
    assert teacher is not None
    if config.clamp_mode == "ratio":
        return alpha * (logp - old) + (1 - alpha) * torch.clamp(logp - teacher, -c, c)
    return (logp - old) + (1 - alpha) * torch.clamp(old - teacher, -c, c)


def reference_aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    config: AlgorithmConfig,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> torch.Tensor:
    lengths = mask.sum(1)
    sequences = total_sequences if total_sequences is not None else (lengths > 0).sum().item()
    sequences = sequences or 1.0  # no sequence: the sum is 0 whatever it is divided by
    if config.aggregation == "token-mean":
        tokens = total_tokens if total_tokens is not None else mask.sum().item()
        return (per_token * mask).sum() / (tokens or 1.0)
    if config.aggregation == "seq-mean-token-mean":
        return ((per_token * mask).sum(1) / lengths.clamp(min=1)).sum() / sequences
    return (per_token * mask).sum() / sequences


def reference_k(logp: torch.Tensor, other: torch.Tensor, estimator: str) -> torch.Tensor:
    log_q_over_p = other - logp
    if estimator == "k1":
        return -log_q_over_p
    if estimator == "k2":
        return 0.5 * log_q_over_p**2
    return torch.exp(log_q_over_p) - log_q_over_p - 1


def reference_top_k_forward_kl(
    trainer_top_k: torch.Tensor, teacher_top_k: torch.Tensor
) -> torch.Tensor:  # [B, T]: Σ_v p_T(v)·(log p_T(v) − log π_θ(v)) over the top-k ids v
    return (torch.exp(teacher_top_k) * (teacher_top_k - trainer_top_k)).sum(dim=-1)


def reference_policy_loss(
    inputs: LossInputs,
    config: AlgorithmConfig,
    step: int = 0,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> torch.Tensor:
    advantages = inputs.advantages[:, None]
    mask = inputs.loss_mask.float()
    ratio = torch.exp(reference_log_ratio(inputs, config))
    clipped = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if config.dual_clip is not None:  # for A < 0: min(L, −C·A)
        dual = torch.minimum(per_token, -config.dual_clip * advantages)
        per_token = torch.where(advantages < 0, dual, per_token)
    if config.tis_cap is not None:
        weight = torch.exp(inputs.old_logprobs - inputs.rollout_logprobs).clamp(max=config.tis_cap)
        per_token = per_token * weight
    loss = reference_aggregate(per_token, mask, config, total_tokens, total_sequences)
    if config.kl_beta > 0:
        assert inputs.ref_logprobs is not None
        kl = reference_k(inputs.trainer_logprobs, inputs.ref_logprobs, "k3")
        loss = loss + config.kl_beta * reference_aggregate(
            kl, mask, config, total_tokens, total_sequences
        )
    if isinstance(config, KdrlConfig):
        assert inputs.teacher_logprobs is not None
        if config.kd_estimator == "topk":
            assert inputs.trainer_top_k_logprobs is not None
            assert inputs.teacher_top_k_logprobs is not None
            kd = reference_top_k_forward_kl(
                inputs.trainer_top_k_logprobs, inputs.teacher_top_k_logprobs
            )
        else:
            kd = reference_k(inputs.trainer_logprobs, inputs.teacher_logprobs, config.kd_estimator)
        if config.kd_reward_masking:
            assert inputs.correct is not None
            kd = kd * (~inputs.correct)[:, None]
        loss = loss + kd_beta(step, config) * reference_aggregate(
            kd, mask, config, total_tokens, total_sequences
        )
    return loss
