"""The RL update, the `algorithm:` block of a run config: TRRD (the paper's loss), GRPO, KDRL.

A union tagged by `name`; each variant carries only its own settings. Defaults follow
the paper (arXiv 2602.22495; docs/design.md#the-math). `trainer.loss.policy_loss` and
`trainer.advantages.group_advantages` take the variant as their only knob.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from services.config.base import StrictModel

ClampMode = Literal["ratio", "anchor"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
# Estimators of KL(π_θ ‖ π_T) at the sampled token (the KL penalty to the reference uses k3).
SampledEstimator = Literal["k1", "k2", "k3"]
KdEstimator = Literal["k1", "k2", "k3", "topk"]


class AlgorithmBase(StrictModel):
    """What every algorithm shares: the PPO clip, the loss aggregation, the optional KL
    penalty and importance weights, and the group advantages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uses_teacher: ClassVar[bool]  # whether the loss reads teacher logprobs
    # Whether it reads them where every advantage is 0 too (KDRL's KD term): then the
    # scorer must score every group, even one whose rewards are all equal.
    teacher_on_every_group: ClassVar[bool] = False

    @property
    def teacher_top_k(self) -> bool:
        """Whether the loss reads the teacher's top-k (`scorer.top_k`), not only its
        logprob of each sampled token."""
        return False

    # Each variant narrows it to its own tag; declared here so that it comes first.
    name: str = Field(description="Which algorithm: trrd, grpo or kdrl.")
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


class TrrdConfig(AlgorithmBase):
    """Trust Region Ratio Distillation: the PPO ratio anchored partly on the teacher."""

    uses_teacher = True  # whatever alpha

    name: Literal["trrd"] = Field(default="trrd", description="The paper's TRRD.")
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the student's OLD policy in the ratio anchor (paper Eq. 3): "
        "log r = alpha*(logp - logp_old) + (1-alpha)*clamp(logp - logp_T, -c, c). "
        "1 = GRPO, 0 = trust region anchored on the teacher alone.",
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


class GrpoConfig(AlgorithmBase):
    """Plain GRPO: TRRD with alpha = 1, no teacher needed."""

    uses_teacher = False

    name: Literal["grpo"] = Field(default="grpo", description="GRPO, without a teacher.")


class KdrlConfig(AlgorithmBase):
    """KDRL: GRPO plus beta_kd * KD(student, teacher)."""

    uses_teacher = True
    teacher_on_every_group = True

    name: Literal["kdrl"] = Field(default="kdrl", description="GRPO plus a KD term.")
    kd_estimator: KdEstimator = Field(
        default="k2",
        description="Per-token KD term. k1, k2, k3 estimate KL(pi_theta || pi_T) at the "
        "sampled token, with d = logp - logp_T: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d. "
        "topk is the forward KL(pi_T || pi_theta) over the teacher's top-k ids v, "
        "sum_v p_T(v)*(log p_T(v) - log pi_theta(v)), not renormalised; it needs "
        "scorer.top_k > 0.",
    )
    kd_beta_start: float = Field(default=5e-3, ge=0.0, description="beta_kd at step 0.")
    kd_beta_end: float = Field(
        default=1e-3, ge=0.0, description="beta_kd from step kd_anneal_steps on."
    )
    kd_anneal_steps: int = Field(
        default=1000,
        ge=0,
        description="Steps over which beta_kd moves linearly from start to end (0: "
        "kd_beta_end from the first step).",
    )
    kd_reward_masking: bool = Field(
        default=False,
        description="Reward-guided masking: no KD term on completions judged correct.",
    )

    @property
    def teacher_top_k(self) -> bool:
        return self.kd_estimator == "topk"


def _algorithm_name(value: Any) -> Any:
    # `name` may be left out of the YAML: the paper's TRRD.
    return value.get("name", "trrd") if isinstance(value, dict) else getattr(value, "name", None)


VARIANTS: dict[str, type[AlgorithmBase]] = {
    "trrd": TrrdConfig,
    "grpo": GrpoConfig,
    "kdrl": KdrlConfig,
}

AlgorithmConfig = Annotated[
    Annotated[TrrdConfig, Tag("trrd")]
    | Annotated[GrpoConfig, Tag("grpo")]
    | Annotated[KdrlConfig, Tag("kdrl")],
    Discriminator(_algorithm_name),
]


def switch_algorithm(block: Mapping[str, Any], name: str) -> dict[str, Any]:
    """An `algorithm:` block turned into algorithm `name`: the settings every algorithm
    shares are kept, those only another variant has are dropped (for sweeps over a base)."""
    fields = VARIANTS[name].model_fields
    return {**{key: value for key, value in block.items() if key in fields}, "name": name}
