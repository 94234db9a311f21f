"""Every shipped experiment config parses, and the cross-field checks catch mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config.algorithm import GrpoConfig
from services.config.run import RunConfig, load_run_config

CONFIGS = sorted(Path(__file__).resolve().parents[3].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path: Path) -> None:
    config = load_run_config(path)
    assert config.trainer.steps >= 1


def test_configs_exist() -> None:
    assert any(p.name == "tiny-cpu.yaml" for p in CONFIGS)


def test_overrides_use_dotted_keys(tmp_path: Path) -> None:
    config = load_run_config(CONFIGS[0], {"trainer.steps": 3, "name": "x"})
    assert (config.trainer.steps, config.name) == (3, "x")


BASE = {"student": "s", "teacher": "t", "task": {"name": "kk"}}


def test_teacher_losses_refuse_passthrough_scoring() -> None:
    with pytest.raises(ValidationError, match="needs teacher logprobs"):
        RunConfig.model_validate({**BASE, "scorer": {"mode": "passthrough"}})
    grpo = {**BASE, "algorithm": {"name": "grpo"}, "scorer": {"mode": "passthrough"}}
    assert isinstance(RunConfig.model_validate(grpo).algorithm, GrpoConfig)


def test_teacher_mode_needs_a_teacher() -> None:
    with pytest.raises(ValidationError, match="needs `teacher`"):
        RunConfig.model_validate({"student": "s", "task": {"name": "kk"}})
    remote = {"student": "s", "task": {"name": "kk"}, "teacher_urls": ["http://t:8000"]}
    assert RunConfig.model_validate(remote).teacher is None


def test_synchronous_batches_end_on_request_boundaries() -> None:
    bad = {**BASE, "rollout": {"synchronous": True, "prompts_per_request": 3}}
    with pytest.raises(ValidationError, match="multiple"):
        RunConfig.model_validate(bad)


@pytest.mark.parametrize(("name", "skips"), [("trrd", True), ("grpo", True), ("kdrl", False)])
def test_the_scorer_skips_equal_reward_groups_except_for_kdrl(name: str, skips: bool) -> None:
    for asked in ({}, {"skip_zero_variance": True}):  # kdrl's KD term needs every group
        run = RunConfig.model_validate({**BASE, "algorithm": {"name": name}, "scorer": asked})
        assert run.scorer.skip_zero_variance is skips
    off = {**BASE, "algorithm": {"name": name}, "scorer": {"skip_zero_variance": False}}
    assert RunConfig.model_validate(off).scorer.skip_zero_variance is False


def test_degraded_scoring_is_opt_in() -> None:
    run = RunConfig.model_validate(BASE)
    assert (run.scorer.on_teacher_down, run.scorer.degrade_after_s) == ("wait", 120.0)
    with pytest.raises(ValidationError, match="on_teacher_down"):
        RunConfig.model_validate({**BASE, "scorer": {"on_teacher_down": "drop"}})


def test_kd_estimator_topk_needs_the_scorer_to_store_the_top_k() -> None:
    kdrl = {**BASE, "algorithm": {"name": "kdrl", "kd_estimator": "topk"}}
    with pytest.raises(ValidationError, match=r"kd_estimator 'topk' needs .* scorer\.top_k is 0"):
        RunConfig.model_validate(kdrl)
    assert RunConfig.model_validate({**kdrl, "scorer": {"top_k": 8}}).scorer.top_k == 8
    with pytest.raises(ValidationError, match="less than or equal to 64"):
        RunConfig.model_validate({**kdrl, "scorer": {"top_k": 65}})
    # A local teacher must serve that many.
    capped = {**kdrl, "scorer": {"top_k": 8}, "teacher_server": {"max_top_k": 4}}
    with pytest.raises(
        ValidationError, match=r"scorer\.top_k 8 exceeds teacher_server\.max_top_k 4"
    ):
        RunConfig.model_validate(capped)
