"""Per-token pieces of the RL loss, each given with its derivative with respect to `logp`.

Every term of the loss is a weighted sum over tokens of a per-token function of the
trainer's logprob `logp`, so `trainer.loss` evaluates the values and the derivatives in
one no-grad pass and hands the summed derivative to autograd (no graph over [B, T]
intermediates, no second pass in backward). The tests check each derivative against
plain autograd on the formulas as written in docs/design.md#the-math.

Indicators are float 1/0 tensors written with `out=` rather than bool masks: on the CPU
a bool mask followed by `where`/`masked_fill` costs more than the whole ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.config.algorithm import AlgorithmConfig, SampledEstimator, TrrdConfig

# exp(20) ~ 4.9e8: log-ratios are capped here so that ratios, losses and gradients stay
# finite in fp32 for any logprobs (e.g. -1e4 against 0).
LOG_RATIO_CAP = 20.0


@dataclass
class Ratio:
    ratio: torch.Tensor  # [B, T] r = exp(log r), log r capped at LOG_RATIO_CAP
    slope: torch.Tensor | None  # [B, T] d log r / d logp; None where it is 1 everywhere
    teacher_in_band: torch.Tensor | None  # [B, T] 1 where the teacher clamp does not engage
    teacher_gap_sum: torch.Tensor | None  # Σ_mask (logp − logp_T), when computed anyway


def trrd_ratio(
    trainer_logprobs: torch.Tensor,  # [B, T] logp (detached)
    old_logprobs: torch.Tensor,  # [B, T] logp_old
    teacher_logprobs: torch.Tensor | None,  # [B, T] logp_T; read by trrd only
    teacher_mask: torch.Tensor,  # [B, T] float: loss tokens of the rows with a teacher
    config: AlgorithmConfig,
    teacher_rows: torch.Tensor | None = None,  # [B] float 1/0; None: every row has one
) -> Ratio:
    """TRRD's ratio, paper Eq. 3 with α weighting the student's OLD policy:

    ratio mode:  log r = α·(logp − logp_old) + (1 − α)·clamp(logp − logp_T, −c, c)
    anchor mode: log r = (logp − logp_old) + (1 − α)·clamp(logp_old − logp_T, −c, c)

    Both equal `logp − α·logp_old − (1 − α)·logp_T` while the clamp is idle. In ratio
    mode the clamped term is constant beyond ±c, so those tokens move log r at rate α
    only; the anchor mode clamps a constant, so every token keeps slope 1. At exactly
    ±c the clamp is idle (as torch.clamp's gradient has it). For grpo and kdrl this is
    GRPO's `log r = logp − logp_old`, and so it is, with α = 1, on a row that has no
    teacher logprobs (`teacher_rows` 0: a degraded group); there the clamp counts as idle.
    Buffers are reused in place: on the CPU, fresh [B, T] tensors cost more than the
    arithmetic.
    """
    log_ratio = trainer_logprobs - old_logprobs
    slope = in_band = gap_sum = None
    if isinstance(config, TrrdConfig):
        assert teacher_logprobs is not None, "trainer.loss checks that trrd has a teacher"
        alpha, c = config.alpha, config.teacher_clamp
        # The teacher's share of log r, per row: 1 − α, or 0 (α = 1) without a teacher.
        share: float | torch.Tensor = 1.0 - alpha
        if teacher_rows is not None:
            share = (teacher_rows * (1.0 - alpha)).unsqueeze(1)  # [B, 1]
        if config.clamp_mode == "ratio":
            gap = trainer_logprobs - teacher_logprobs
            gap_sum = torch.dot(gap.reshape(-1), teacher_mask.reshape(-1))
            clamped = gap.clamp(-c, c)
            log_ratio.lerp_(clamped, share)  # (1 − share)·log_ratio + share·clamped
            in_band = _idle_without_teacher(torch.eq(clamped, gap, out=gap), teacher_rows)
            alpha_t = torch.tensor(alpha, dtype=gap.dtype, device=gap.device)
            slope = torch.add(alpha_t, in_band, alpha=1.0 - alpha, out=clamped)  # α + (1−α)·1
        else:
            shift = old_logprobs - teacher_logprobs
            clamped = shift.clamp(-c, c)
            if isinstance(share, torch.Tensor):
                log_ratio.addcmul_(clamped, share)
            else:
                log_ratio.add_(clamped, alpha=share)
            in_band = _idle_without_teacher(torch.eq(clamped, shift, out=shift), teacher_rows)
    ratio = log_ratio.clamp_(max=LOG_RATIO_CAP).exp_()
    return Ratio(ratio, slope, in_band, gap_sum)


def _idle_without_teacher(
    in_band: torch.Tensor,  # [B, T] 1/0
    teacher_rows: torch.Tensor | None,  # [B] 1/0
) -> torch.Tensor:
    """The clamp never engages on a row without a teacher: in band there, so that its
    slope is 1 (α + (1 − α)·1) and it counts no clamped token."""
    if teacher_rows is None:
        return in_band
    return torch.maximum(in_band, (1.0 - teacher_rows).unsqueeze(1), out=in_band)


def clip_bounds(
    advantages: torch.Tensor,  # [B]
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # lower, upper [B, 1]
    """Per-sequence bounds on r that reproduce `−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)`.

    For A > 0 the min is `A·min(r, 1+ε_high)`: only the upper bound acts. For A < 0 it is
    `A·max(r, 1−ε_low)`: only the lower bound acts, and dual-clip (standard dual-clip PPO,
    loss = min(−min(r·A, clip(r)·A), −C·A)) caps r at C. For A = 0 nothing is clipped.
    """
    negative_cap = math.exp(LOG_RATIO_CAP) if config.dual_clip is None else config.dual_clip
    lower = torch.where(advantages < 0, 1.0 - config.eps_low, 0.0)
    upper = torch.where(advantages > 0, 1.0 + config.eps_high, negative_cap)
    return lower.unsqueeze(1), upper.unsqueeze(1)


def clipped_ratio(
    ratio: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B]
    config: AlgorithmConfig,
) -> torch.Tensor:  # [B, T] the r in the token loss −A·clipped_ratio
    lower, upper = clip_bounds(advantages, config)
    # clamp(ratio, lower, upper) with [B, 1] bounds, in two ops that are 4x faster on the CPU.
    clipped = torch.maximum(ratio, lower)
    return torch.minimum(clipped, upper, out=clipped)


def truncated_importance_weight(
    old_logprobs: torch.Tensor,  # [B, T]
    rollout_logprobs: torch.Tensor,  # [B, T]
    cap: float,
) -> torch.Tensor:  # [B, T] min(exp(logp_old − logp_rollout), cap), no gradient
    return (old_logprobs - rollout_logprobs).clamp_(max=math.log(cap)).exp_()


def divergence(
    trainer_logprobs: torch.Tensor,  # [B, T] logp
    other_logprobs: torch.Tensor,  # [B, T] logp of the teacher or the reference
    estimator: SampledEstimator,
) -> tuple[torch.Tensor, torch.Tensor]:  # value, d value / d logp; both [B, T]
    """Per-token estimators of KL(π_θ ‖ π_other) on tokens sampled from π_θ, d = logp − other:

    k1 = d                     (derivative 1)
    k2 = d²/2                  (derivative d)
    k3 = exp(−d) − 1 + d       (derivative 1 − exp(−d)); −d is capped at LOG_RATIO_CAP
    """
    d = trainer_logprobs - other_logprobs
    if estimator == "k1":
        return d, torch.ones_like(d)
    if estimator == "k2":
        return d.square().mul_(0.5), d
    neg_d = d.neg().clamp_(max=LOG_RATIO_CAP)
    exp_neg_d = neg_d.exp()
    return exp_neg_d.sub(neg_d).sub_(1.0), exp_neg_d.neg_().add_(1.0)


def top_k_forward_kl(
    trainer_top_k_logprobs: torch.Tensor,  # [B, T, k] log π_θ(v) at the teacher's top-k ids
    teacher_top_k_logprobs: torch.Tensor,  # [B, T, k] log p_T(v), best first
) -> tuple[torch.Tensor, torch.Tensor]:  # value [B, T], d value / d log π_θ(v) [B, T, k]
    """The forward KL(p_T ‖ π_θ) over the teacher's top-k ids, with the full-vocabulary
    logprobs of both, not renormalised over the top-k:

    KD = Σ_v p_T(v)·(log p_T(v) − log π_θ(v))      (derivative −p_T(v), whatever π_θ)

    As verl's `forward_kl_topk` does. Renormalising the student over the top-k too (NeMo-RL's
    default) would leave the mass it puts outside them free; here the softmax takes it
    back, and the minimum over π_θ is p_T renormalised over the top-k (KD = m·log m ≥ −1/e
    there, with m the teacher's top-k mass). With k the whole vocabulary it is the exact
    forward KL.
    """
    teacher_probs = teacher_top_k_logprobs.exp()
    value = torch.linalg.vecdot(teacher_probs, teacher_top_k_logprobs - trainer_top_k_logprobs)
    return value, teacher_probs.neg_()
