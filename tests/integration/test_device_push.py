"""Device weight pushes on a GPU (skipped without CUDA): CUDA IPC from a model on the GPU
into a transformers rollout server on the same GPU, through the version gate and the
probe; and the DeepSpeed trainer in bf16, at ZeRO 2 and 3, training on the GPU and pushing
every step over the path `push_transport: auto` picks for such a server (CUDA IPC)."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.queue.keys import SCORED
from services.queue.queues import GroupQueue
from services.weights.nccl_client import NcclSyncClient
from services.weights.probe import make_probe, probe_token_ids
from tests.integration.groups import scored_group
from tests.integration.trainer_runs import RUN, write_config
from trainer.device_push import CudaIpcSender
from trainer.weight_buckets import iter_buckets, plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="device pushes need a CUDA GPU"),
]


@pytest.fixture
def server(tmp_path: Path, tiny_student: Path) -> Iterator[str]:
    """A transformers rollout server on the GPU that takes device pushes."""
    port = free_port()
    argv = [sys.executable, "-m", "services.cli.main", "serve-rollout", "--model"]
    argv += [str(tiny_student), "--backend", "hf", "--port", str(port), "--device", "cuda"]
    argv += ["--dtype", "bfloat16", "--nccl-weight-transfer"]
    proc = ManagedProcess("rollout", argv, tmp_path / "rollout.log").start()
    try:
        proc.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def served_version(url: str) -> int:
    return int(httpx.get(f"{url}/v1/info").json()["policy_version"])


def test_cuda_ipc_push_is_verified_and_a_wrong_probe_keeps_the_old_weights(
    server: str, tiny_student: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    client = NcclSyncClient(server)
    assert client.routes_enabled()
    buckets = plan(model, bucket_bytes=64 * 1024)  # several buckets through one buffer
    assert len(buckets) > 1
    sender = CudaIpcSender([client], buckets, torch.device("cuda"))
    probe = make_probe(model, probe_token_ids(128), atol=5e-2)
    (response,) = sender.send(iter_buckets(buckets, zero_stage=0), 1, probe)
    assert (response.policy_version, response.transport) == (1, "cuda_ipc")
    assert response.probe_max_abs_diff is not None and response.probe_max_abs_diff <= 5e-2
    wrong = probe.model_copy(update={"logprobs": [lp - 1.0 for lp in probe.logprobs]})
    with pytest.raises(RuntimeError, match="probe_mismatch"):
        sender.send(iter_buckets(buckets, zero_stage=0), 2, wrong)
    assert served_version(server) == 1
    generated = httpx.post(f"{server}/v1/generate", json={"prompts": [[5, 6, 7]]}, timeout=60)
    assert generated.status_code == 200 and generated.json()["policy_version"] == 1


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_trainer_trains_in_bf16_on_the_gpu_and_pushes_through_cuda_ipc(
    tmp_path: Path,
    tiny_student: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
    server: str,
    zero_stage: int,
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    rng = random.Random(5)
    for i in range(6):
        queue.publish(SCORED, scored_group(i, rng), counter="scored")
    config = write_config(tmp_path, tiny_student, steps=3, zero_stage=zero_stage, max_staleness=100)
    argv = [sys.executable, "-m", "services.cli.main", "train", "--config", str(config)]
    argv += ["--redis-url", redis_url, "--rollout-url", server]
    trainer = ManagedProcess(
        "trainer", argv, tmp_path / "trainer.log", env={"DS_ACCELERATOR": "cuda"}
    ).start()
    assert trainer.wait(timeout_s=600) == 0, trainer.tail(60)
    assert "over cuda_ipc" in " ".join(trainer.log_path.read_text().split())
    rows = [json.loads(line) for line in (tmp_path / RUN / "metrics.jsonl").open()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["push_probe_diff"] <= 5e-2 and r["grad_norm"] > 0 for r in rows)
    assert served_version(server) == 3
