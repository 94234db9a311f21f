"""The GPU smoke run's plan and checks, without a GPU: which backends, weight push and GPUs
it picks, and that it fails on a run that missed a step, a verified push or a reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.config.run import RunConfig
from services.launch.gpu_smoke import STEPS, figures, plan


@pytest.mark.parametrize(
    ("gpus", "with_vllm", "backend", "push", "rollout_gpu"),
    [
        (["0"], False, "hf", "cuda_ipc", "0"),  # one host, one GPU: CUDA IPC
        (["2", "5"], True, "vllm", "nccl", "5"),  # NCCL needs the server on its own GPU
        (["0"], True, "vllm", "http", "0"),  # NCCL refuses two ranks on one GPU
    ],
)
def test_the_plan_takes_the_fastest_push_the_servers_allow(
    gpus: list[str], with_vllm: bool, backend: str, push: str, rollout_gpu: str
) -> None:
    run, placement, chosen = plan(gpus, with_vllm)
    assert chosen == run.trainer.push_transport == push
    assert run.rollout_server.backend == run.teacher_server.backend == backend  # type: ignore[union-attr]
    assert run.rollout_server.nccl_weight_transfer == (push != "http")
    assert (run.trainer.steps, run.trainer.zero_stage, run.trainer.dtype) == (STEPS, 2, "bf16")
    assert placement["rollout"]["CUDA_VISIBLE_DEVICES"] == rollout_gpu
    assert placement["trainer"]["CUDA_VISIBLE_DEVICES"] == gpus[0]


def metrics_row(step: int) -> dict[str, float]:
    return {
        "step": step,
        "policy_version": step,
        "push_probe_diff": 0.0,
        "push_time_s": 0.02,
        "push_gb": 0.002,
        "step_time_s": 0.1,
        "reward_mean": -0.5,
    }


def run_with(folder: Path, rows: list[dict[str, float]]) -> RunConfig:
    run, _, _ = plan(["0"], False)
    run = run.model_copy(update={"run_dir": folder})
    run.folder.mkdir(parents=True)
    (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_figures_come_from_a_complete_run_and_a_gap_fails_it(tmp_path: Path) -> None:
    rows = [metrics_row(step) for step in range(1, STEPS + 1)]
    complete = run_with(tmp_path / "complete", rows)
    result = figures(complete, "cuda_ipc", STEPS, {"teacher": 1e5, "rollout": 2e4})
    assert result["gpu_weight_push_s_per_gb"] == pytest.approx(10.0)
    assert result["gpu_step_time_s"] == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="serves version 19"):
        figures(complete, "cuda_ipc", STEPS - 1, {})
    del rows[4]["push_probe_diff"]
    with pytest.raises(RuntimeError, match=r"unverified at steps \[5\]"):
        figures(run_with(tmp_path / "gap", rows), "cuda_ipc", STEPS, {})
