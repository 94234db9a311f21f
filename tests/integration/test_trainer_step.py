"""One DeepSpeed training step in-process: the update must not depend on how the global
batch is cut into micro-batches, for every loss aggregation mode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import redis
import torch

from services.config.run import RunConfig
from services.queue.queues import GroupQueue
from tests.integration.groups import scored_group
from trainer.deepspeed_setup import full_state_dict
from trainer.train import Trainer


def one_step(
    student: Path, folder: Path, client: redis.Redis, budget: int, aggregation: str
) -> tuple[float, dict[str, torch.Tensor]]:
    run = RunConfig.model_validate(
        {
            "name": f"step-{budget}",
            "run_dir": str(folder),
            "student": str(student),
            "teacher": str(student),
            "task": {"name": "kk"},
            "algorithm": {"name": "trrd", "aggregation": aggregation},
            "trainer": {"micro_batch_tokens": budget, "lr": 1e-3, "steps": 1},
        }
    )
    trainer = Trainer(run, GroupQueue(client, "test"), rollout_urls=[])
    rng = random.Random(7)
    groups = [scored_group(i, rng) for i in range(3)]
    metrics = trainer.train_step(groups)
    assert metrics["reward_mean"] == pytest.approx(0.5)
    return metrics["grad_norm"], full_state_dict(trainer.engine, zero_stage=0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_update_is_independent_of_micro_batching(
    tmp_path: Path, tiny_student: Path, fresh_redis: redis.Redis, aggregation: str
) -> None:
    norm_whole, whole = one_step(tiny_student, tmp_path, fresh_redis, 100_000, aggregation)
    norm_pieces, pieces = one_step(tiny_student, tmp_path, fresh_redis, 64, aggregation)
    # The gradient norm (before clipping) catches a wrong scale, which Adam's first step
    # would hide; the weights catch a wrong direction.
    assert norm_whole > 0
    assert norm_pieces == pytest.approx(norm_whole, rel=1e-5)
    initial = full_state_dict_of(tiny_student)
    assert sum((whole[k] - initial[k]).abs().sum().item() for k in whole) > 0
    for name in whole:
        torch.testing.assert_close(pieces[name], whole[name], atol=1e-5, rtol=1e-4)


def full_state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_a_batch_without_signal_leaves_the_weights_alone(
    tmp_path: Path, tiny_student: Path, fresh_redis: redis.Redis
) -> None:
    run = RunConfig.model_validate(
        {
            "name": "no-signal",
            "run_dir": str(tmp_path),
            "student": str(tiny_student),
            "teacher": str(tiny_student),
            "task": {"name": "kk"},
            "algorithm": {"name": "trrd"},
            "trainer": {"lr": 1e-3},
        }
    )
    trainer = Trainer(run, GroupQueue(fresh_redis, "test"), rollout_urls=[])
    rng = random.Random(3)
    assert trainer.train_step([scored_group(i, rng) for i in range(2)])["skipped_update"] == 0
    after_real_step = full_state_dict(trainer.engine, zero_stage=0)
    flat = [scored_group(i, rng) for i in range(2)]
    for group in flat:  # every completion rewarded alike: all advantages are zero
        for completion in group.completions:
            completion.reward = 1.0
    # Adam's momentum from the first step would still move the weights if it stepped.
    assert trainer.train_step(flat)["skipped_update"] == 1
    for name, value in full_state_dict(trainer.engine, zero_stage=0).items():
        assert torch.equal(value, after_real_step[name]), name


def test_bf16_with_gradient_checkpointing_matches_the_fp32_step(
    tmp_path: Path, tiny_student: Path, fresh_redis: redis.Redis
) -> None:
    def step(dtype: str, checkpointing: bool) -> tuple[float, Trainer]:
        run = RunConfig.model_validate(
            {
                "name": f"{dtype}-{checkpointing}",
                "run_dir": str(tmp_path),
                "student": str(tiny_student),
                "teacher": str(tiny_student),
                "task": {"name": "kk"},
                "algorithm": {"name": "trrd"},
                "trainer": {"dtype": dtype, "gradient_checkpointing": checkpointing, "lr": 1e-3},
            }
        )
        trainer = Trainer(run, GroupQueue(fresh_redis, "test"), rollout_urls=[])
        rng = random.Random(11)
        return trainer.train_step([scored_group(i, rng) for i in range(3)])["grad_norm"], trainer

    fp32_norm, _ = step("fp32", checkpointing=False)
    bf16_norm, trainer = step("bf16", checkpointing=True)
    assert next(trainer.engine.module.parameters()).dtype == torch.bfloat16
    # The loss is computed in fp32 from bf16 logits: the gradient differs by bf16 rounding only.
    assert bf16_norm == pytest.approx(fp32_norm, rel=5e-2)
    assert {v.dtype for v in full_state_dict(trainer.engine, zero_stage=0).values()} == {
        torch.float32
    }


def test_groups_without_teacher_logprobs_train_beside_scored_ones(
    tmp_path: Path, tiny_student: Path, fresh_redis: redis.Redis
) -> None:
    """A TRRD step on a scored group, one the scorer skipped (rewards all equal) and one it
    forwarded degraded: it trains, and the teacher metrics are those of the scored group."""

    def trainer(name: str) -> Trainer:
        run = RunConfig.model_validate(
            {
                "name": name,
                "run_dir": str(tmp_path),
                "student": str(tiny_student),
                "teacher": str(tiny_student),
                "task": {"name": "kk"},
                "algorithm": {"name": "trrd"},
                "trainer": {"micro_batch_tokens": 64},
            }
        )
        return Trainer(run, GroupQueue(fresh_redis, "test"), rollout_urls=[])

    rng = random.Random(11)
    scored, skipped, degraded = (scored_group(i, rng) for i in range(3))
    for completion in skipped.completions:
        completion.teacher_logprobs, completion.reward = None, 1.0
    for completion in degraded.completions:
        completion.teacher_logprobs = None
    degraded.degraded = True
    mixed = trainer("mixed").train_step([scored, skipped, degraded])
    alone = trainer("alone").train_step([scored])
    assert mixed["skipped_update"] == 0 and mixed["grad_norm"] > 0
    assert mixed["zero_variance_groups"] == 1
    for key in ("teacher_logprob_gap", "teacher_clamp_frac"):
        assert mixed[key] == pytest.approx(alone[key], rel=1e-5), key
