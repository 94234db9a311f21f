"""The transformers backend's end of a device push: CUDA IPC from a trainer on this host.

`init` maps the trainer's bucket buffer (`services.weights.cuda_ipc`) and reads back its
check pattern, so a trainer that cannot share memory with this server learns it before
any weight moves; `start` copies the serving model; each `update` copies one bucket's
slots into the copy; `finish` requires every parameter to have arrived, probes the copy
and only then swaps it in (`HFRolloutEngine.probe_and_swap`). Any failure drops the copy:
the weights that served keep serving, at their version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from services.common.http_server import ApiError
from services.common.protocol import WeightProbe
from services.weights.cuda_ipc import CHECK_BYTES, Slot, check_pattern, open_shared, unpack

if TYPE_CHECKING:
    from rollout_server.hf_backend import HFRolloutEngine
    from rollout_server.versioned import Transport

Opener = Callable[[dict[str, Any], torch.device], torch.Tensor]


def open_on_gpu(shared: dict[str, Any], device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        raise ApiError(
            400,
            "no_gpu",
            f"device pushes need the model on a GPU; this server runs on {device}: push over "
            "http or file",
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return open_shared(shared, index)


class CudaIpcReceiver:
    """The transformers engine's `DeviceReceiver`: a copy of the model, filled bucket by
    bucket from the trainer's mapped buffer, serves only once complete and probed."""

    transport: Transport = "cuda_ipc"

    def __init__(self, engine: HFRolloutEngine, open_buffer: Opener = open_on_gpu) -> None:
        self.engine = engine
        self._open = open_buffer
        self.buffer: torch.Tensor | None = None
        self.candidate: Any = None
        self.targets: dict[str, torch.Tensor] = {}
        self.missing: dict[int, str] = {}  # parameter id -> its first name

    async def init(self, init_info: dict[str, Any]) -> None:
        shared = init_info.get("cuda_ipc")
        if not isinstance(shared, dict):
            raise ApiError(
                400,
                "wrong_transport",
                "this transformers server takes CUDA IPC device pushes (trainer.push_transport "
                "cuda_ipc or auto), not vLLM's NCCL transfer",
            )
        try:
            buffer = await asyncio.to_thread(self._open, shared, self.engine.device)
        except ApiError:
            raise
        except Exception as exc:  # a handle from another host, or no peer access
            raise ApiError(
                400, "ipc_unavailable", f"cannot map the trainer's memory: {exc}"
            ) from exc
        if buffer[:CHECK_BYTES].tolist() != check_pattern():
            raise ApiError(
                400, "ipc_unavailable", "the trainer's buffer reads back wrong through IPC"
            )
        self.buffer = buffer

    async def start(self) -> None:
        if self.buffer is None:
            raise ApiError(409, "no_init", "call /v1/weights/nccl/init first")
        self.candidate = await asyncio.to_thread(self.engine.copy_model)
        self.targets = dict(self.candidate.named_parameters(remove_duplicate=False))
        self.missing = {}
        for name, param in self.targets.items():
            self.missing.setdefault(id(param), name)

    async def update(self, update_info: dict[str, Any]) -> int:
        if self.candidate is None or self.buffer is None:
            raise ApiError(409, "no_update", "call /v1/weights/nccl/start first")
        try:
            slots = [Slot.model_validate(s) for s in update_info.get("slots", [])]
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", f"update_info.slots: {exc}") from None
        problems = [self._problem(slot) for slot in slots]
        if any(problems):
            raise ApiError(422, "schema_mismatch", "; ".join(p for p in problems if p))
        await asyncio.to_thread(self._copy, slots)
        return sum(slot.nbytes() for slot in slots)

    def _problem(self, slot: Slot) -> str | None:
        target = self.targets.get(slot.name)
        if target is None:
            return f"{slot.name}: no such parameter"
        if list(target.shape) != slot.shape:
            return f"{slot.name}: shape {slot.shape}, the model has {list(target.shape)}"
        if not slot.torch_dtype.is_floating_point:
            return f"{slot.name}: dtype {slot.dtype} is not a float type"
        return None

    def _copy(self, slots: list[Slot]) -> None:
        assert self.buffer is not None
        with torch.no_grad():
            for name, tensor in unpack(self.buffer, slots):
                target = self.targets[name]
                target.copy_(tensor)  # casts to the serving dtype
                self.missing.pop(id(target), None)
        if self.buffer.is_cuda:
            # Answering lets the trainer overwrite the buffer with the next bucket.
            torch.cuda.synchronize(self.buffer.device)

    async def finish(self, probe: WeightProbe | None) -> float | None:
        if self.missing:
            first = next(iter(self.missing.values()))
            raise ApiError(
                422,
                "incomplete_update",
                f"{len(self.missing)} parameters never arrived (first: {first}); the old "
                "weights keep serving",
            )
        candidate, self.candidate, self.targets = self.candidate, None, {}
        return await asyncio.to_thread(self.engine.probe_and_swap, candidate, probe)

    async def abandon(self, exc: BaseException) -> ApiError:
        self.candidate, self.targets, self.missing = None, {}, {}
        if isinstance(exc, ApiError):
            return exc
        return ApiError(
            500, "load_failed", f"the device update failed: {exc}; the old weights serve"
        )
