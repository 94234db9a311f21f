"""The `algorithm` variants: the defaults of docs/design.md#the-math, each variant's own
settings, and the rules on them."""

from __future__ import annotations

import pytest
from loss_reference import algorithm
from pydantic import ValidationError

from services.config.algorithm import GrpoConfig, KdrlConfig, TrrdConfig

VARIANTS = [TrrdConfig, GrpoConfig, KdrlConfig]


def test_defaults_are_the_papers() -> None:
    config = TrrdConfig()
    assert (config.name, config.alpha, config.teacher_clamp, config.clamp_mode) == (
        "trrd",
        0.5,
        1.0,
        "ratio",
    )
    assert (config.eps_low, config.eps_high, config.dual_clip) == (0.2, 0.28, None)
    assert (config.aggregation, config.kl_beta, config.tis_cap) == ("token-mean", 0.0, None)
    assert (config.std_normalize, config.filter_zero_variance) == (True, False)
    kdrl = KdrlConfig()
    assert (kdrl.kd_estimator, kdrl.kd_beta_start, kdrl.kd_beta_end) == ("k2", 5e-3, 1e-3)
    assert kdrl.kd_reward_masking is False


def test_name_selects_the_variant_and_defaults_to_trrd() -> None:
    assert isinstance(algorithm(), TrrdConfig)
    assert isinstance(algorithm(name="grpo"), GrpoConfig)
    assert isinstance(algorithm(name="kdrl", kd_estimator="k3"), KdrlConfig)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.__name__)
def test_every_field_is_documented(variant: type[TrrdConfig]) -> None:
    for name, field in variant.model_fields.items():
        assert field.description, f"{variant.__name__}.{name} has no description"


@pytest.mark.parametrize("name", ["grpo", "kdrl"])
def test_grpo_and_kdrl_are_trrd_with_alpha_one_and_take_no_alpha(name: str) -> None:
    # Their loss is TRRD's at α = 1 (test_loss.py); α is not theirs to set.
    with pytest.raises(ValidationError, match="alpha"):
        algorithm(name=name, alpha=1.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"alpha": -0.1},
        {"alpha": 1.5},
        {"teacher_clamp": 0.0},
        {"eps_low": 1.0},
        {"eps_high": -0.1},
        {"dual_clip": 1.0},
        {"kl_beta": -1.0},
        {"tis_cap": 0.0},
        {"name": "kdrl", "kd_anneal_steps": -1},
        {"clamp_mode": "both"},
        {"aggregation": "sum"},
        {"name": "kdrl", "kd_estimator": "k4"},
        {"kd_reward_masking": True},  # only kdrl has a KD term to mask
        {"name": "grpo", "teacher_clamp": 1.0},  # grpo has no teacher
        {"name": "ppo"},
        {"unknown_field": 1},
    ],
)
def test_rejects_invalid_settings(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        algorithm(**fields)


def test_teacher_use_follows_the_algorithm() -> None:
    assert TrrdConfig().uses_teacher
    assert TrrdConfig(alpha=1.0).uses_teacher  # trrd always reads the teacher
    assert KdrlConfig(kd_reward_masking=True).uses_teacher
    assert not GrpoConfig().uses_teacher
