"""The whole loop, for real: embedded Redis, the vLLM rollout server, the teacher server,
scorer, rollout worker and the DeepSpeed trainer as separate processes on loopback —
started by the same code as `rlad up`."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from services.clients.rollout import RolloutClient
from services.common.logprobs import sequence_logprobs
from services.common.protocol import GenerateRequest, SamplingParams
from services.config.run import RunConfig
from services.launch.cpu_placement import CORES_ENV, available_cores, cpu_placement
from services.launch.processes import ManagedProcess
from services.launch.up import pipeline, queue_accounts

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

STEPS = 3


def tiny_run(folder: Path, student: Path, teacher: Path) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "e2e",
            "run_dir": str(folder),
            "student": str(student),
            "teacher": str(teacher),
            "task": {"name": "kk", "people": [2], "rendering": "compact"},
            # An untrained student earns equal rewards, hence zero advantages and no policy
            # gradient; KDRL's distillation term still moves the weights every step.
            "algorithm": {"name": "kdrl", "kd_beta_start": 0.5, "kd_beta_end": 0.5},
            "trainer": {"steps": STEPS, "batch_prompts": 2, "checkpoint_every": 2, "lr": 1e-4},
            "rollout": {"group_size": 4, "prompts_per_request": 2, "max_tokens": 24},
            "queue": {"max_backlog": 8},
            "rollout_server": {"backend": "vllm"},
            "teacher_server": {"backend": "hf"},
        }
    )


def cores_of(id_list: str) -> set[int]:
    return {int(core) for core in id_list.split(",")}


def wait_for_exit(trainer: ManagedProcess, processes: list[ManagedProcess]) -> int:
    deadline = time.monotonic() + 600
    while trainer.alive():
        for proc in processes:
            proc.check_alive()
        assert time.monotonic() < deadline, trainer.tail()
        time.sleep(0.5)
    return trainer.wait()


async def served_logprobs(url: str, prompt: list[int]) -> tuple[list[int], list[float], int]:
    async with RolloutClient([url]) as client:
        response = await client.generate(
            GenerateRequest(
                prompts=[prompt],
                sampling=SamplingParams(n=1, temperature=1.0, max_tokens=12, seed=3),
            )
        )
    completion = response.results[0].completions[0]
    return completion.token_ids, completion.logprobs, response.policy_version


def test_pipeline_trains_pushes_and_accounts_for_every_group(
    tmp_path: Path, tiny_student: Path, tiny_teacher: Path
) -> None:
    run = tiny_run(tmp_path, tiny_student, tiny_teacher)
    with pipeline(run) as running:
        assert wait_for_exit(running.trainer, running.stack.processes) == 0, running.trainer.tail()
        # Without a GPU each server is pinned to its cores: the rollout engine to the first
        # half, the transformers teacher beside the trainer.
        placement = cpu_placement(available_cores(), "hf")
        for proc in running.stack.processes:
            if proc.name in ("rollout", "teacher"):
                assigned = placement[proc.name][CORES_ENV]
                assert os.sched_getaffinity(proc.pid) == cores_of(assigned), proc.name
        # After the last step the rollout server serves exactly the trainer's final weights:
        # its sampling logprobs equal a transformers forward pass of the exported model.
        prompt = [5, 6, 7, 8]
        tokens, logprobs, version = asyncio.run(served_logprobs(running.rollout_url, prompt))
        assert version == STEPS
        final = AutoModelForCausalLM.from_pretrained(run.folder / "final").eval()
        initial = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            expected, _ = sequence_logprobs(final, ids, torch.ones_like(ids))
            before, _ = sequence_logprobs(initial, ids, torch.ones_like(ids))
        served = torch.tensor(logprobs)
        torch.testing.assert_close(served, expected[0, len(prompt) - 1 :], atol=1e-4, rtol=0)
        assert (served - before[0, len(prompt) - 1 :]).abs().max() > 1e-3, "weights moved"
        # Quiesce the producers, then every group is accounted for.
        for proc in running.stack.processes:
            if proc.name in ("rollout-worker", "scorer"):
                proc.stop()
        accounts = queue_accounts(redis.Redis.from_url(running.redis_url), "e2e")
    settled = sum(accounts.get(k, 0) for k in ("trained", "stale", "dead"))
    assert accounts["produced"] == settled + accounts["in_rollouts"] + accounts["in_scored"], (
        accounts
    )
    assert accounts["trained"] == STEPS * 2
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "reward_mean", "accuracy", "kd", "grad_norm", "tokens_per_s"):
        assert key in rows[-1], key
    assert all(r["grad_norm"] > 0 for r in rows)
    assert (run.folder / "logs" / "trainer.log").exists()
    # Without a GPU the engines keep to their half of the cores (the trainer has the rest), not
    # where vLLM's automatic binding would put them.
    bind = cpu_placement(available_cores(), "hf")["rollout"]["VLLM_CPU_OMP_THREADS_BIND"]
    assert (
        f"VLLM_CPU_OMP_THREADS_BIND={bind!r}" in (run.folder / "logs" / "rollout.log").read_text()
    )
