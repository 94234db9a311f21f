"""`make gpu-smoke`: the whole pipeline on this machine's GPU(s) for 20 steps, checked and
measured (run by `scripts/gpu_smoke.sh`, which first installs what is missing).

What `rlad up` runs — embedded Redis, the teacher and rollout servers, the scorer, the
rollout worker and the DeepSpeed trainer (ZeRO-2, bf16) — on the tiny models, with vLLM
where it is installed and the transformers backends otherwise, and the fastest weight push
the servers take: CUDA IPC into a transformers server on the trainer's GPU; vLLM's NCCL
group with a vLLM server on a second GPU; HTTP to vLLM on a single GPU (NCCL refuses two
ranks on one device). Then it checks that every step trained and pushed, that the server
verified every push with the probe and serves the last version, that rewards were logged
and that no process is left, measures the servers' throughput with a fixed burst each, and
prints one `name: value` per line, `gpu_smoke_ok: 1` last when every check passed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from services.clients.rollout import RolloutClient
from services.clients.teacher import TeacherClient
from services.common.protocol import GenerateRequest, SamplingParams, ScoreSequence
from services.config.run import RunConfig, load_run_config
from services.launch.up import Pipeline, pipeline
from trainer.metrics_sink import read_metrics

STEPS = 20
BASE_CONFIG = Path("configs/tiny-cpu.yaml")
# From the driver's start to the end of training: then come the bursts and the teardown,
# within the 420 s that scripts/gpu_smoke.sh gives the driver (8 minutes in all).
TRAINING_DEADLINE_S = 360.0


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan(gpus: list[str], with_vllm: bool) -> tuple[RunConfig, dict[str, dict[str, str]], str]:
    """The run config, each process's GPU, and the weight push."""
    backend = "vllm" if with_vllm else "hf"
    push = "cuda_ipc" if not with_vllm else "nccl" if len(gpus) > 1 else "http"
    server: dict[str, object] = {"backend": backend, "dtype": "bfloat16"}
    if with_vllm:
        server["gpu_memory_utilization"] = 0.25  # two engines and the trainer share a GPU
    overrides: dict[str, object] = {
        "name": "gpu-smoke",
        "cpu_placement": False,
        "trainer.steps": STEPS,
        "trainer.checkpoint_every": STEPS,
        "trainer.zero_stage": 2,
        "trainer.dtype": "bf16",
        "trainer.push_transport": push,
        "rollout_server": {**server, "nccl_weight_transfer": push != "http"},
        "teacher_server": dict(server),
    }
    first, rollout = gpus[0], gpus[1] if push == "nccl" else gpus[0]
    placement = {
        "trainer": {"CUDA_VISIBLE_DEVICES": first},
        "teacher": {"CUDA_VISIBLE_DEVICES": first},
        "rollout": {"CUDA_VISIBLE_DEVICES": rollout},
    }
    return load_run_config(BASE_CONFIG, overrides), placement, push


async def rollout_tokens_per_s(client: RolloutClient) -> float:
    """Completion tokens per second of one request of 8 prompts x 8 samples x 200 tokens."""
    request = GenerateRequest(
        prompts=[list(range(5, 40))] * 8,
        sampling=SamplingParams(n=8, temperature=1.0, max_tokens=200, seed=0),
    )
    await client.generate(request)  # warm-up
    started = time.perf_counter()
    response = await client.generate(request)
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for r in response.results for c in r.completions)
    return tokens / elapsed


async def teacher_tokens_per_s(client: TeacherClient) -> float:
    """Scored tokens per second of 64 sequences of up to 256 tokens in one call."""
    length = min(256, (await client.info()).max_model_len)
    generator = torch.Generator().manual_seed(0)
    sequences = [
        ScoreSequence(token_ids=torch.randint(5, 100, (length,), generator=generator).tolist())
        for _ in range(64)
    ]
    await client.score(sequences[:4])  # warm-up
    started = time.perf_counter()
    await client.score(sequences)
    return 64 * (length - 1) / (time.perf_counter() - started)


async def measure(running: Pipeline) -> tuple[int, dict[str, float]]:
    """The version the rollout server serves, and each server's throughput."""
    async with (
        RolloutClient([running.rollout_url]) as rollout,
        TeacherClient(running.teacher_urls) as teacher,
    ):
        served = (await rollout.info()).policy_version or 0
        rates = {
            "rollout": await rollout_tokens_per_s(rollout),
            "teacher": await teacher_tokens_per_s(teacher),
        }
    return served, rates


def wait_for_training(running: Pipeline, deadline: float) -> None:
    while running.trainer.alive():
        running.stack.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"training not done {TRAINING_DEADLINE_S:.0f}s after the start")
        time.sleep(1.0)
    code = running.trainer.wait()
    if code != 0:
        raise RuntimeError(f"trainer exited with code {code}:\n{running.trainer.tail()}")


def process_left(running: Pipeline) -> list[str]:
    """Names of the pipeline's processes (whole process groups) still alive."""
    left = []
    for proc in running.stack.processes:
        try:
            os.killpg(proc.pid, 0)
            left.append(proc.name)
        except ProcessLookupError:
            pass
    pid = getattr(running.stack.redis_server, "pid", None)
    if pid and Path(f"/proc/{pid}").exists():
        left.append("redis")
    return left


def figures(run: RunConfig, push: str, served: int, rates: dict[str, float]) -> dict[str, Any]:
    """The checks on metrics.jsonl, and the figures: medians over steps 2.. (step 1 warms up)."""
    rows = read_metrics(run.folder / "metrics.jsonl")
    problems = []
    if [r["step"] for r in rows] != list(range(1, STEPS + 1)):
        problems.append(f"steps logged: {[r['step'] for r in rows]}")
    unverified = [r["step"] for r in rows if "push_probe_diff" not in r]
    wrong = [r["step"] for r in rows if r.get("policy_version") != r["step"]]
    if unverified or wrong or served != STEPS:
        problems.append(
            f"pushes: unverified at steps {unverified}, version off at {wrong}, the server "
            f"serves version {served} (expected {STEPS})"
        )
    if any("reward_mean" not in r for r in rows):
        problems.append("a step logged no reward")
    if problems:
        raise RuntimeError("; ".join(problems))
    later = rows[1:]
    push_s = statistics.median(r["push_time_s"] for r in later)
    push_gb = statistics.median(r["push_gb"] for r in later)
    return {
        "gpu_rollout_backend": run.rollout_server.backend,
        "gpu_push_transport": push,
        "gpu_step_time_s": round(statistics.median(r["step_time_s"] for r in later), 4),
        "gpu_weight_push_s": round(push_s, 4),
        "gpu_weight_push_gb": round(push_gb, 6),
        "gpu_weight_push_s_per_gb": round(push_s / push_gb, 3),
        "gpu_teacher_tokens_per_s": round(rates["teacher"]),
        "gpu_rollout_tokens_per_s": round(rates["rollout"]),
        "gpu_reward_first5": round(statistics.mean(r["reward_mean"] for r in rows[:5]), 3),
        "gpu_reward_last5": round(statistics.mean(r["reward_mean"] for r in rows[-5:]), 3),
    }


def smoke() -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to torch")
    started = time.monotonic()
    run, placement, push = plan(visible_gpus(), importlib.util.find_spec("vllm") is not None)
    print(f"run folder: {run.folder} (logs in {run.folder / 'logs'})", flush=True)
    with pipeline(run, placement=placement) as running:
        wait_for_training(running, started + TRAINING_DEADLINE_S)
        served, rates = asyncio.run(measure(running))
    left = process_left(running)
    if left:
        raise RuntimeError(f"processes left after the run: {left}")
    return {
        "gpu_device": torch.cuda.get_device_name(0),
        **figures(run, push, served, rates),
        "gpu_smoke_wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    try:
        result = smoke()
    except Exception as exc:
        print(f"gpu smoke failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("gpu_smoke_ok: 0")
        return 1
    for name, value in result.items():
        print(f"{name}: {value}")
    print("gpu_smoke_ok: 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
