"""Device pushes into the transformers engine, through `/v1/weights/nccl/*`'s handler,
on the CPU: a CPU buffer stands in for the trainer's GPU memory (only the opening of a
CUDA IPC handle is left out; `tests/integration/test_device_push.py` does it on a GPU).
An accepted push serves exactly the sent weights at its version; a wrong probe, a missing
or unknown tensor leave the weights that served serving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from transformers import PreTrainedModel

from rollout_server.backends import load_engine
from rollout_server.cuda_ipc import CudaIpcReceiver
from rollout_server.hf_backend import HFRolloutEngine
from rollout_server.nccl import NcclUpdates
from services.common.http_server import ApiError
from services.common.protocol import (
    GenerateRequest,
    NcclFinishRequest,
    NcclInitRequest,
    NcclStartRequest,
    NcclUpdateRequest,
    SamplingParams,
    WeightProbe,
    WeightUpdateResponse,
)
from services.config.servers import RolloutServerConfig
from services.weights.cuda_ipc import CHECK_BYTES, buffer_bytes, check_pattern, layout, pack
from services.weights.probe import make_probe, probe_token_ids
from tests.model_support import perturbed_model

T = TypeVar("T")
BUFFERS: dict[int, torch.Tensor] = {}  # "IPC handles": the trainer's buffers by key


def open_from_registry(shared: dict[str, Any], device: torch.device) -> torch.Tensor:
    return BUFFERS[int(shared["key"])]


class Device:
    """The server's device-push handler on one event loop, and the trainer's side of it."""

    def __init__(self, engine: HFRolloutEngine) -> None:
        self.engine = engine
        self.updates = NcclUpdates(engine)
        self.updates.receiver = CudaIpcReceiver(engine, open_buffer=open_from_registry)
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def push(
        self,
        model: PreTrainedModel,
        version: int,
        probe: WeightProbe | None,
        drop: str | None = None,
        rename: dict[str, str] | None = None,
    ) -> WeightUpdateResponse:
        """Two buckets through one buffer, as `CudaIpcSender` sends them."""
        items = [(n, p.detach()) for n, p in model.named_parameters() if n != drop]
        names = [(rename or {}).get(n, n) for n, _ in items]
        slots = layout((name, t.dtype, t.shape) for name, (_, t) in zip(names, items, strict=True))
        buffer = torch.zeros(max(CHECK_BYTES, buffer_bytes(slots)), dtype=torch.uint8)
        buffer[:CHECK_BYTES] = torch.tensor(check_pattern(), dtype=torch.uint8)
        BUFFERS[id(buffer)] = buffer
        self.run(self.updates.init(NcclInitRequest(init_info={"cuda_ipc": {"key": id(buffer)}})))
        self.run(self.updates.start(NcclStartRequest(version=version)))
        half = len(items) // 2
        finish = NcclFinishRequest(probe=probe)
        try:
            for part in (slice(0, half), slice(half, None)):
                pack(buffer, slots[part], [t for _, t in items[part]])
                info = {"slots": [s.model_dump() for s in slots[part]]}
                self.run(self.updates.update(NcclUpdateRequest(update_info=info)))
        except ApiError:
            # Like the sender: `finish` releases the gate after a refused part.
            with contextlib.suppress(ApiError):
                self.run(self.updates.finish(finish))
            raise
        return self.run(self.updates.finish(finish))

    def generated_version(self) -> int:
        request = GenerateRequest(prompts=[[5, 6, 7]], sampling=SamplingParams(max_tokens=4))
        return self.run(self.engine.generate(request)).policy_version


@pytest.fixture(scope="module")
def device(tied_student: Path) -> Iterator[Device]:
    config = RolloutServerConfig(model=str(tied_student), backend="hf", nccl_weight_transfer=True)
    engine = load_engine(config)
    assert isinstance(engine, HFRolloutEngine)
    yield Device(engine)
    engine.shutdown()


def serving_equals(engine: HFRolloutEngine, model: PreTrainedModel) -> bool:
    sent = model.state_dict()
    return all(torch.equal(v, sent[k]) for k, v in engine.model.state_dict().items())


def test_a_device_push_serves_the_sent_weights_at_its_version(
    device: Device, tied_student: Path
) -> None:
    model = perturbed_model(tied_student, seed=1)
    probe = make_probe(model, probe_token_ids(128), atol=1e-4)
    response = device.push(model, version=1, probe=probe)
    assert (response.policy_version, response.transport) == (1, "cuda_ipc")
    assert response.bytes == sum(p.numel() * 4 for p in model.parameters())
    assert response.probe_max_abs_diff is not None and response.probe_max_abs_diff <= 1e-4
    assert serving_equals(device.engine, model)
    assert device.engine.info().policy_version == device.generated_version() == 1


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"wrong_probe": True}, 422, "probe_mismatch"),
        ({"drop": "model.norm.weight"}, 422, "incomplete_update"),
        ({"rename": {"model.norm.weight": "model.nope.weight"}}, 422, "schema_mismatch"),
    ],
)
def test_a_refused_device_push_leaves_the_old_weights_serving(
    device: Device, tied_student: Path, change: dict[str, Any], status: int, reason: str
) -> None:
    serving = device.engine.info().policy_version or 0
    before = {k: v.clone() for k, v in device.engine.model.state_dict().items()}
    model = perturbed_model(tied_student, seed=50 + serving)
    probe = make_probe(model, probe_token_ids(128), atol=1e-4)
    if change.pop("wrong_probe", False):
        probe = probe.model_copy(update={"logprobs": [lp - 1.0 for lp in probe.logprobs]})
    with pytest.raises(ApiError) as refused:
        device.push(model, version=serving + 1, probe=probe, **change)
    assert (refused.value.status, refused.value.type) == (status, reason)
    after = device.engine.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert device.engine.info().policy_version == device.generated_version() == serving
    # The gate is free again: the next push goes through.
    assert device.push(model, version=serving + 1, probe=None).policy_version == serving + 1


def test_without_a_gpu_or_with_nccl_init_the_handshake_is_refused(device: Device) -> None:
    cpu = NcclUpdates(device.engine)  # the real CUDA IPC opener
    with pytest.raises(ApiError) as no_gpu:
        device.run(cpu.init(NcclInitRequest(init_info={"cuda_ipc": {"key": 0}})))
    assert (no_gpu.value.status, no_gpu.value.type) == (400, "no_gpu")
    nccl_info = {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2}
    with pytest.raises(ApiError) as wrong:
        device.run(cpu.init(NcclInitRequest(init_info=nccl_info)))
    assert (wrong.value.status, wrong.value.type) == (400, "wrong_transport")
