"""AlgorithmConfig: DESIGN.md section 4 defaults, and the cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.algorithm import AlgorithmConfig


def test_defaults_are_the_papers() -> None:
    config = AlgorithmConfig()
    assert (config.name, config.alpha, config.teacher_clamp, config.clamp_mode) == (
        "trrd",
        0.5,
        1.0,
        "ratio",
    )
    assert (config.eps_low, config.eps_high, config.dual_clip) == (0.2, 0.28, None)
    assert (config.aggregation, config.kl_beta, config.tis_cap) == ("token-mean", 0.0, None)
    assert (config.std_normalize, config.filter_zero_variance) == (True, False)
    assert (config.kd_estimator, config.kd_beta_start, config.kd_beta_end) == ("k2", 5e-3, 1e-3)
    assert config.kd_reward_masking is False


def test_every_field_is_documented() -> None:
    for name, field in AlgorithmConfig.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize("name", ["grpo", "kdrl"])
def test_grpo_and_kdrl_mean_alpha_one(name: str) -> None:
    assert AlgorithmConfig(name=name).alpha == 1.0
    assert AlgorithmConfig(name=name, alpha=1.0).alpha == 1.0
    with pytest.raises(ValidationError, match="alpha = 1"):
        AlgorithmConfig(name=name, alpha=0.5)


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
        {"kd_anneal_steps": -1},
        {"clamp_mode": "both"},
        {"aggregation": "sum"},
        {"kd_estimator": "k4"},
        {"kd_reward_masking": True},  # only meaningful for kdrl
        {"unknown_field": 1},
    ],
)
def test_rejects_invalid_settings(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AlgorithmConfig(**fields)  # type: ignore[arg-type]


def test_teacher_use_follows_the_algorithm() -> None:
    assert AlgorithmConfig().uses_teacher
    assert AlgorithmConfig(alpha=1.0).uses_teacher  # trrd always reads the teacher
    assert AlgorithmConfig(name="kdrl", kd_reward_masking=True).uses_teacher
    assert not AlgorithmConfig(name="grpo").uses_teacher
