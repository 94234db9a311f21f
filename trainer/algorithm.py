"""The one configuration object of the RL update: TRRD (the paper's loss), GRPO and KDRL.

Defaults follow DESIGN.md section 4 and the paper (arXiv 2602.22495). The trainer reads it
from the `algorithm:` block of a run config; `trainer.loss.policy_loss` and
`trainer.advantages.group_advantages` take it as their only knob.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AlgorithmName = Literal["trrd", "grpo", "kdrl"]
ClampMode = Literal["ratio", "anchor"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KdEstimator = Literal["k1", "k2", "k3"]


class AlgorithmConfig(BaseModel):
    """Loss and advantage settings. `grpo` and `kdrl` are TRRD with α = 1 (plus a KD term)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AlgorithmName = Field(
        default="trrd",
        description="'trrd': the paper's Trust Region Ratio Distillation; 'grpo': plain GRPO "
        "(TRRD with alpha = 1, no teacher needed); 'kdrl': GRPO + beta_kd * KD(student, teacher).",
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the student's OLD policy in the ratio anchor (paper Eq. 3): "
        "log r = alpha*(logp - logp_old) + (1-alpha)*clamp(logp - logp_T, -c, c). "
        "1 = GRPO, 0 = trust region anchored on the teacher alone. Forced to 1 for grpo/kdrl.",
    )
    teacher_clamp: float = Field(
        default=1.0,
        gt=0.0,
        description="c: bound on the teacher log-ratio term (paper Appendix B).",
    )
    clamp_mode: ClampMode = Field(
        default="ratio",
        description="'ratio' (the paper): clamp logp - logp_T inside the ratio; tokens beyond "
        "+-c get only the alpha share of the gradient. 'anchor': clamp the constant shift "
        "logp_old - logp_T instead, log r = (logp - logp_old) + (1-alpha)*clamp(logp_old - "
        "logp_T, -c, c), which keeps the full gradient on every token.",
    )
    eps_low: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Lower PPO clip: r is clipped at 1 - eps_low."
    )
    eps_high: float = Field(
        default=0.28, ge=0.0, description="Upper PPO clip (clip-higher): r clipped at 1 + eps_high."
    )
    dual_clip: float | None = Field(
        default=None,
        gt=1.0,
        description="Dual-clip constant C (typically 3) for negative advantages: the token "
        "loss -A*r is capped at -C*A, i.e. r counts at most C. None disables it.",
    )
    aggregation: Aggregation = Field(
        default="token-mean",
        description="How token losses become one number: 'token-mean' (sum over all tokens / "
        "number of tokens), 'seq-mean-token-mean' (mean over sequences of each sequence's "
        "token mean), 'seq-mean-token-sum' (mean over sequences of each sequence's token sum).",
    )
    kl_beta: float = Field(
        default=0.0,
        ge=0.0,
        description="beta of the optional KL_k3(pi_theta || pi_ref) penalty. 0 (default): no "
        "reference model is loaded.",
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0.0,
        description="Truncated importance sampling for stale or mismatched rollouts: each "
        "token's policy loss is weighted by min(exp(logp_old - logp_rollout), tis_cap) "
        "(no gradient). None disables it.",
    )
    std_normalize: bool = Field(
        default=True,
        description="Divide group advantages by the group's reward std (GRPO); False gives "
        "Dr. GRPO's mean-centred advantages.",
    )
    filter_zero_variance: bool = Field(
        default=False,
        description="Drop groups whose rewards are all equal (their advantages are 0 anyway): "
        "'dynamic sampling'. They are counted either way.",
    )
    kd_estimator: KdEstimator = Field(
        default="k2",
        description="KDRL's per-token KD estimator of KL(pi_theta || pi_T) with d = logp - "
        "logp_T: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d.",
    )
    kd_beta_start: float = Field(default=5e-3, ge=0.0, description="KDRL: beta_kd at step 0.")
    kd_beta_end: float = Field(
        default=1e-3, ge=0.0, description="KDRL: beta_kd from step kd_anneal_steps on."
    )
    kd_anneal_steps: int = Field(
        default=1000,
        ge=0,
        description="KDRL: steps over which beta_kd moves linearly from start to end "
        "(0: kd_beta_end from the first step).",
    )
    kd_reward_masking: bool = Field(
        default=False,
        description="KDRL: reward-guided masking, no KD term on completions judged correct.",
    )

    @model_validator(mode="before")
    @classmethod
    def _grpo_means_alpha_one(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") in ("grpo", "kdrl"):
            alpha = data.get("alpha", 1.0)
            if alpha != 1.0:
                raise ValueError(
                    f"name={data['name']!r} is TRRD with alpha = 1; got alpha={alpha}. "
                    "Leave alpha out, or use name='trrd' to mix in the teacher."
                )
            data = {**data, "alpha": 1.0}
        return data

    @model_validator(mode="after")
    def _kd_settings_only_for_kdrl(self) -> AlgorithmConfig:
        if self.kd_reward_masking and self.name != "kdrl":
            raise ValueError("kd_reward_masking applies to the KD term of name='kdrl' only")
        return self

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads teacher logprobs: TRRD (whatever alpha) and KDRL."""
        return self.name != "grpo"
