"""vLLM's NCCL weight transfer through the rollout server's gate (two GPUs: NCCL refuses
two ranks on one device): after `send_weights()`, the server serves the trainer's weights
at the new version."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.bootstrap.tiny_models import save_tiny_model
from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.weights.probe import make_probe, probe_token_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.vllm,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="NCCL weight transfer needs two CUDA GPUs (NCCL refuses two ranks on one)",
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("nccl")
    model = save_tiny_model(tmp / "student", "student", seed=0)
    port = free_port()
    argv = [sys.executable, "-m", "services.cli.main", "serve-rollout", "--model", str(model)]
    argv += ["--backend", "vllm", "--port", str(port), "--nccl-weight-transfer"]
    argv += ["--gpu-memory-utilization", "0.3"]
    # The server on the second GPU; the test's model stays on the first.
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    second = listed.split(",")[1] if listed else "1"
    server = ManagedProcess(
        "rollout-nccl", argv, tmp / "server.log", env={"CUDA_VISIBLE_DEVICES": second}
    ).start()
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=600)
        yield f"http://127.0.0.1:{port}", model
    finally:
        server.stop()


def test_nccl_update_is_verified_and_versioned(served: tuple[str, Path]) -> None:
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
    )

    from services.weights.nccl_client import NcclSyncClient

    url, model_dir = served
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    sync = NcclSyncClient(url)
    engine = NCCLTrainerWeightTransferEngine.trainer_init(
        NCCLTrainerInitInfo(
            master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=0
        ),
        client=sync,
        source=ModuleSource(model),
    )
    sync.version, sync.probe = 1, make_probe(model, probe_token_ids(128), atol=1e-3)
    engine.send_weights()
    assert sync.last_response is not None
    assert (sync.last_response.policy_version, sync.last_response.transport) == (1, "nccl")
    # A wrong probe is refused loudly; NCCL weights have no copy on disk to restore, so
    # the server says so (500) and refuses to generate until a full update arrives.
    sync.version = 2
    probe = make_probe(model, probe_token_ids(128), atol=1e-3)
    sync.probe = probe.model_copy(update={"logprobs": [lp - 1.0 for lp in probe.logprobs]})
    with pytest.raises(RuntimeError, match="restore_failed"):
        engine.send_weights()
    refused = httpx.post(f"{url}/v1/generate", json={"prompts": [[5, 6]]})
    assert (refused.status_code, refused.json()["error"]["type"]) == (503, "weights_unverified")
