"""The RL loss of one micro-batch: TRRD, GRPO (TRRD with α = 1) or KDRL, plus its metrics.

    L = Σ_t w_t·[ τ_t·(−A·clip(r_t)) + β·KL_k3,t + β_kd·KD_t ]

with `r` the TRRD ratio (`trainer.surrogate`), `τ` the optional truncated importance
weight, and `w` the aggregation weights over `loss_mask`. KDRL's KD term is an estimator
at the sampled token (k1/k2/k3), or the forward KL over the teacher's top-k ids (`topk`),
which also reads the trainer's logprobs at those ids. Micro-batches: pass the global
batch's `total_tokens` / `total_sequences` (see `policy_loss`) and the micro-batch losses
add up to the global-batch loss in every aggregation mode.

A row without teacher logprobs (`has_teacher` 0: a group the scorer forwarded degraded, or
skipped because its rewards are all equal) is trained with α = 1 — GRPO's ratio — and no
KD term; the other rows keep the configured loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.config.algorithm import AlgorithmConfig, KdrlConfig
from trainer.surrogate import (
    clipped_ratio,
    divergence,
    top_k_forward_kl,
    trrd_ratio,
    truncated_importance_weight,
)


@dataclass
class LossInputs:
    """Per-token tensors are [B, T] over the same grid; positions outside `loss_mask`
    (prompt, padding) may hold any finite value and contribute nothing."""

    trainer_logprobs: torch.Tensor  # [B, T] logp under the weights being trained (with grad)
    old_logprobs: torch.Tensor  # [B, T] logp_old: the weights at the start of the step
    rollout_logprobs: torch.Tensor  # [B, T] what the sampler reported (for TIS)
    advantages: torch.Tensor  # [B] one per completion
    loss_mask: torch.Tensor  # [B, T] 1 = real completion token
    teacher_logprobs: torch.Tensor | None = None  # [B, T] logp_T; needed by trrd / kdrl
    # [B] 1/0: rows whose teacher_logprobs are real; the others (any values there) are
    # trained with α = 1 and no KD. None: every row has them.
    has_teacher: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference policy; needed if kl_beta > 0
    correct: torch.Tensor | None = None  # [B] bool; for KDRL's reward-guided masking
    # KDRL's topk estimator: the teacher's top-k logprobs and the trainer's at the same ids
    # (with grad), both full-vocabulary logprobs; any values on rows without a teacher.
    teacher_top_k_logprobs: torch.Tensor | None = None  # [B, T, k]
    trainer_top_k_logprobs: torch.Tensor | None = None  # [B, T, k]
    entropy: torch.Tensor | None = None  # [B, T] policy entropy, no grad; a metric only


def kd_beta(step: int, config: KdrlConfig) -> float:
    """KDRL's β_kd: linear from kd_beta_start at step 0 to kd_beta_end at kd_anneal_steps."""
    if config.kd_anneal_steps == 0:
        return config.kd_beta_end
    progress = min(max(step, 0) / config.kd_anneal_steps, 1.0)
    return config.kd_beta_start + (config.kd_beta_end - config.kd_beta_start) * progress


def aggregation_scale(
    lengths: torch.Tensor,  # [B] loss tokens per sequence
    config: AlgorithmConfig,
    total_tokens: float | None,
    total_sequences: float | None,
) -> torch.Tensor:  # [B] s: the loss is Σ_i s_i·Σ_t mask·(token loss)
    """token-mean: 1/N_tokens; seq-mean-token-mean: 1/(len_i·N_seqs); seq-mean-token-sum:
    1/N_seqs. N_tokens is `loss_mask.sum()` and N_seqs the number of rows with at least one
    loss token, unless the global batch's counts are given. A sequence must not be split
    across micro-batches (its length enters seq-mean-token-mean)."""
    if config.aggregation == "token-mean":
        tokens = lengths.sum().item() if total_tokens is None else total_tokens
        return torch.full_like(lengths, 1.0 / tokens if tokens > 0 else 0.0)
    sequences = (lengths > 0).sum().item() if total_sequences is None else total_sequences
    scale = torch.full_like(lengths, 1.0 / sequences if sequences > 0 else 0.0)
    if config.aggregation == "seq-mean-token-mean":
        scale = scale / lengths.clamp(min=1.0)
    return scale


# Metrics about the teacher: means over the loss tokens of rows that have one (weight them
# by those tokens, `MicroBatch.teacher_tokens`, to combine micro-batches and ranks).
TEACHER_METRICS = frozenset({"teacher_logprob_gap", "teacher_clamp_frac", "kd"})


class _PrecomputedGradient(torch.autograd.Function):
    """A scalar loss whose gradients with respect to `logprobs` and, when there is one,
    `top_k_logprobs` (`top_k_grad` not None) were computed with it."""

    @staticmethod
    def forward(
        ctx: Any,
        value: torch.Tensor,
        grad: torch.Tensor,
        top_k_grad: torch.Tensor | None,
        logprobs: torch.Tensor,
        top_k_logprobs: torch.Tensor | None,
    ) -> Any:
        ctx.save_for_backward(grad, top_k_grad)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        grad, top_k_grad = ctx.saved_tensors
        top_k = None if top_k_grad is None else top_k_grad * grad_output
        return None, None, None, grad * grad_output, top_k


def _masked_sum(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return torch.dot(values.reshape(-1), loss_mask.reshape(-1))


def _check_inputs(inputs: LossInputs, config: AlgorithmConfig, has_tokens: bool) -> None:
    if config.uses_teacher and inputs.teacher_logprobs is None:
        raise ValueError(f"algorithm {config.name!r} needs teacher_logprobs; use 'grpo' without")
    if config.kl_beta > 0 and inputs.ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs (the reference model's logprobs)")
    masking = isinstance(config, KdrlConfig) and config.kd_reward_masking
    if masking and inputs.correct is None and has_tokens:
        raise ValueError("kd_reward_masking needs `correct` (a verdict for every completion)")
    top_k = (inputs.teacher_top_k_logprobs, inputs.trainer_top_k_logprobs)
    if config.teacher_top_k and any(t is None for t in top_k):
        raise ValueError(
            "kd_estimator topk needs teacher_top_k_logprobs and trainer_top_k_logprobs"
        )


def policy_loss(
    inputs: LossInputs,
    config: AlgorithmConfig,
    step: int,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (differentiable in `trainer_logprobs`) and its metrics.

    `total_tokens` / `total_sequences`: the global batch's loss-token count and count of
    completions with at least one loss token (`loss_mask.any(1)`), summed over every
    micro-batch (and over ranks, divided by the world size when the data-parallel engine
    averages gradients). With them the micro-batch losses sum to the global-batch loss;
    without them the loss is normalised within this micro-batch.

    Metrics are means over this micro-batch's loss tokens (weight them by
    `loss_mask.sum()` to combine micro-batches and ranks), those of `TEACHER_METRICS` over
    the loss tokens of the rows with a teacher. `loss` is reported as
    `loss·total_tokens/tokens`, so that this token-weighted average returns the summed
    global loss exactly. Keys depend on the config and on which optional inputs are given:
    loss, policy_loss, ratio_mean, clip_frac_low, clip_frac_high, [dual_clip_frac],
    [teacher_logprob_gap], [teacher_clamp_frac (trrd)], [entropy], [kl, kl_loss],
    [kd, kd_loss, kd_beta (kdrl)], [is_weight_mean (tis)].
    """
    mask = inputs.loss_mask.to(torch.float32)  # [B, T]
    logp = inputs.trainer_logprobs.detach().float()  # [B, T]
    with torch.no_grad():
        lengths = mask.sum(dim=1)  # [B]
        tokens = lengths.sum().item()
        _check_inputs(inputs, config, tokens > 0)
        scale = aggregation_scale(lengths, config, total_tokens, total_sequences)  # [B]
        advantages = inputs.advantages.reshape(-1).float()  # [B]
        metric_sums: dict[str, torch.Tensor] = {}  # name -> Σ over loss tokens
        teacher_rows, teacher_mask, teacher_tokens = _teacher_rows(inputs.has_teacher, mask, tokens)

        # Policy term: −A·clip(r), optionally reweighted by the truncated IS weight.
        old = inputs.old_logprobs.float()
        ratio = trrd_ratio(logp, old, inputs.teacher_logprobs, teacher_mask, config, teacher_rows)
        clipped = clipped_ratio(ratio.ratio, advantages, config)
        policy_weights = mask * (scale * advantages.neg()).unsqueeze(1)  # [B, T] s·(−A)
        if config.tis_cap is not None:
            is_weight = truncated_importance_weight(
                old, inputs.rollout_logprobs.float(), config.tis_cap
            )
            policy_weights.mul_(is_weight)
            metric_sums["is_weight_mean"] = _masked_sum(is_weight, mask)
        values = {"policy_loss": _masked_sum(clipped, policy_weights)}
        metric_sums["ratio_mean"] = _masked_sum(ratio.ratio, mask)
        unclipped = torch.eq(clipped, ratio.ratio, out=clipped)  # [B, T] 1/0
        metric_sums.update(_clip_counts(ratio.ratio, unclipped, mask, lengths, advantages, config))
        # d(−A·r)/d logp = −A·r·(d log r / d logp) where unclipped, 0 where clipped.
        grad = ratio.ratio.mul_(policy_weights).mul_(unclipped)  # reuses r's buffer
        if ratio.slope is not None:
            grad.mul_(ratio.slope)

        if ratio.teacher_in_band is not None:
            in_band = _masked_sum(ratio.teacher_in_band, mask)
            metric_sums["teacher_clamp_frac"] = tokens - in_band
        if ratio.teacher_gap_sum is not None:
            metric_sums["teacher_logprob_gap"] = ratio.teacher_gap_sum
        elif inputs.teacher_logprobs is not None:
            teacher_sum = _masked_sum(inputs.teacher_logprobs.float(), teacher_mask)
            metric_sums["teacher_logprob_gap"] = _masked_sum(logp, teacher_mask) - teacher_sum
        if inputs.entropy is not None:
            metric_sums["entropy"] = _masked_sum(inputs.entropy.float(), mask)

        if inputs.ref_logprobs is not None:  # KL_k3(π_θ ‖ π_ref), a penalty when kl_beta > 0
            kl, kl_grad = divergence(logp, inputs.ref_logprobs.float(), "k3")
            metric_sums["kl"] = _masked_sum(kl, mask)
            if config.kl_beta > 0:
                kl_weights = mask * (scale * config.kl_beta).unsqueeze(1)  # [B, T]
                values["kl_loss"] = _masked_sum(kl, kl_weights)
                grad.addcmul_(kl_grad, kl_weights)

        top_k_grad = None  # [B, T, k]: d loss / d trainer_top_k_logprobs
        if isinstance(config, KdrlConfig):
            kd_scale = scale * kd_beta(step, config)  # [B]
            if config.kd_reward_masking and inputs.correct is not None:
                kd_scale = kd_scale * (~inputs.correct.bool()).float()  # no KD on correct ones
            kd_weights = teacher_mask * kd_scale.unsqueeze(1)  # [B, T]; none without a teacher
            if config.kd_estimator == "topk":
                assert inputs.trainer_top_k_logprobs is not None  # checked above
                assert inputs.teacher_top_k_logprobs is not None
                kd, top_k_grad = top_k_forward_kl(
                    inputs.trainer_top_k_logprobs.detach().float(),
                    inputs.teacher_top_k_logprobs.float(),
                )
                top_k_grad.mul_(kd_weights.unsqueeze(2))
            else:
                assert inputs.teacher_logprobs is not None  # checked above
                kd, kd_grad = divergence(logp, inputs.teacher_logprobs.float(), config.kd_estimator)
                grad.addcmul_(kd_grad, kd_weights)
            metric_sums["kd"] = _masked_sum(kd, teacher_mask)
            values["kd_loss"] = _masked_sum(kd, kd_weights)

        value = torch.stack(list(values.values())).sum()
        metrics = _metrics(values, metric_sums, tokens, total_tokens, teacher_tokens)
        if isinstance(config, KdrlConfig):
            metrics["kd_beta"] = kd_beta(step, config)
    grad = grad.to(inputs.trainer_logprobs.dtype)
    top_k_logprobs = inputs.trainer_top_k_logprobs
    if top_k_grad is not None:
        assert top_k_logprobs is not None
        top_k_grad = top_k_grad.to(top_k_logprobs.dtype)
    loss = _PrecomputedGradient.apply(
        value, grad, top_k_grad, inputs.trainer_logprobs, top_k_logprobs
    )
    return loss, metrics


def _teacher_rows(
    has_teacher: torch.Tensor | None,  # [B] 1/0, or None: every row
    mask: torch.Tensor,  # [B, T] float loss mask
    tokens: float,  # mask.sum()
) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """(rows with a teacher as float [B] or None for all, their loss tokens' mask [B, T],
    the number of those tokens)."""
    if has_teacher is None:
        return None, mask, tokens
    rows = has_teacher.reshape(-1).to(mask.dtype)
    teacher_mask = mask * rows.unsqueeze(1)
    return rows, teacher_mask, teacher_mask.sum().item()


def _clip_counts(
    ratio: torch.Tensor,  # [B, T] r
    unclipped: torch.Tensor,  # [B, T] 1/0
    mask: torch.Tensor,  # [B, T]
    lengths: torch.Tensor,  # [B]
    advantages: torch.Tensor,  # [B]
    config: AlgorithmConfig,
) -> dict[str, torch.Tensor]:
    """Clipped loss tokens: the upper clip acts on A > 0, the lower (and dual) on A < 0."""
    clipped_per_row = lengths - torch.linalg.vecdot(unclipped, mask, dim=1)  # [B]
    positive, negative = advantages > 0, advantages < 0
    counts = {"clip_frac_high": clipped_per_row[positive].sum()}
    if config.dual_clip is None:
        counts["clip_frac_low"] = clipped_per_row[negative].sum()
        return counts
    above_cap = torch.gt(ratio, config.dual_clip, out=torch.empty_like(ratio))
    counts["dual_clip_frac"] = torch.linalg.vecdot(above_cap, mask, dim=1)[negative].sum()
    counts["clip_frac_low"] = clipped_per_row[negative].sum() - counts["dual_clip_frac"]
    return counts


def _metrics(
    values: dict[str, torch.Tensor],
    metric_sums: dict[str, torch.Tensor],
    tokens: float,
    total_tokens: float | None,
    teacher_tokens: float,
) -> dict[str, float]:
    """One host sync for all metrics; see `policy_loss` for what each one means."""
    names = list(values) + list(metric_sums)
    numbers = torch.stack([*values.values(), *metric_sums.values()]).tolist()
    per_token = 1.0 / tokens if tokens > 0 else 0.0
    per_teacher_token = 1.0 / teacher_tokens if teacher_tokens > 0 else 0.0
    loss_scale = (tokens if total_tokens is None else total_tokens) * per_token

    def scale(name: str) -> float:
        if name in values:
            return loss_scale
        return per_teacher_token if name in TEACHER_METRICS else per_token

    metrics = {name: number * scale(name) for name, number in zip(names, numbers, strict=True)}
    metrics["loss"] = sum(metrics[name] for name in values)
    return metrics
