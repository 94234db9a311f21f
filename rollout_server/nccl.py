"""Device weight pushes, for servers on GPUs (`--nccl-weight-transfer`).

Optional: nothing else imports this module unless a server runs with the flag. This is
the server's end of the control plane; the trainer's end is
`services.weights.nccl_client.NcclSyncClient`, and what moves the bytes depends on the
backend (a `DeviceReceiver`):
- vLLM: vLLM's NCCL weight-transfer engine (the trainer joins its NCCL group and
  broadcasts; `VllmNccl` below);
- transformers: CUDA IPC from a trainer on the same host (`rollout_server.cuda_ipc`).

`NcclUpdates` serves `POST /v1/weights/nccl/{init,start,update,finish}` and holds the
version gate from `start` to `finish`, so device updates keep the guarantees of the file
and HTTP transports: new requests wait, in-flight ones finish or abort, the probe must
match before the version changes, and a failure restores the previous weights where the
backend can. A watchdog releases the gate if `finish` never comes.

vLLM's NCCL weights exist only in GPU memory; until the next file or HTTP update, a
failed update cannot restore them and answers 500 (see `VLLMRolloutEngine.restore_after`).
The transformers backend receives into a copy of its model, so it always can.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol

import torch

from services.common.http_server import ApiError
from services.common.protocol import (
    NcclFinishRequest,
    NcclInitRequest,
    NcclStartRequest,
    NcclUpdateRequest,
    WeightProbe,
    WeightUpdateResponse,
)

if TYPE_CHECKING:
    from rollout_server.versioned import Transport, VersionedEngine
    from rollout_server.vllm_backend import VLLMRolloutEngine


class DeviceReceiver(Protocol):
    """A backend's end of a device push; `NcclUpdates` holds the gate around it."""

    transport: Transport

    async def init(self, init_info: dict[str, Any]) -> None: ...

    async def start(self) -> None: ...

    async def update(self, update_info: dict[str, Any]) -> int:
        """Receive one part of the weights; returns its size in bytes."""
        ...

    async def finish(self, probe: WeightProbe | None) -> float | None:
        """Serve what was received once the probe matches (its max |diff|); raise otherwise."""
        ...

    async def abandon(self, exc: BaseException) -> ApiError:
        """Undo a started update after `exc`; the error to answer."""
        ...


class VllmNccl:
    """vLLM's NCCL weight-transfer engine behind the gate."""

    transport: Transport = "nccl"

    def __init__(self, engine: VLLMRolloutEngine) -> None:
        self.engine = engine

    async def init(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.engine.llm.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info=init_info)
        )

    async def start(self) -> None:
        await self.engine.llm.start_weight_update()

    async def update(self, update_info: dict[str, Any]) -> int:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        dtypes, shapes = update_info.get("dtype_names", []), update_info.get("shapes", [])
        nbytes = sum(
            torch.empty((), dtype=getattr(torch, str(dtype))).element_size()
            * int(torch.Size(shape).numel())
            for dtype, shape in zip(dtypes, shapes, strict=False)
        )
        await self.engine.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        return nbytes

    async def finish(self, probe: WeightProbe | None) -> float | None:
        engine = self.engine
        await engine.llm.finish_weight_update()
        if not await engine.llm.reset_prefix_cache():
            raise RuntimeError("prefix cache reset refused: requests still running")
        return engine.check_served(probe, await engine.score(engine.probe_ids(probe)))

    async def abandon(self, exc: BaseException) -> ApiError:
        return await self.engine.restore_after(exc)


def receiver_for(engine: VersionedEngine) -> DeviceReceiver:
    """The backend's receiver; each imports its heavy code only when chosen."""
    if engine.backend == "vllm":
        return VllmNccl(engine)  # type: ignore[arg-type]
    from rollout_server.cuda_ipc import CudaIpcReceiver

    return CudaIpcReceiver(engine)  # type: ignore[arg-type]


class NcclUpdates:
    """The four routes' handler: the gate, the watchdog and the version around a receiver."""

    def __init__(self, engine: VersionedEngine) -> None:
        self.engine = engine
        self.receiver = receiver_for(engine)
        self._held: AsyncExitStack | None = None
        self._version = 0
        self._bytes = 0
        self._started = 0.0
        self._watchdog: asyncio.Task[None] | None = None

    async def init(self, request: NcclInitRequest) -> None:
        await self.receiver.init(request.init_info)

    async def start(self, request: NcclStartRequest) -> None:
        if self._held is not None:
            raise ApiError(409, "update_in_progress", "a device update is already running")
        self.engine.check_version(request.version)
        config = self.engine.config
        abort = self.engine._abort_in_flight if config.in_flight_policy == "abort" else None
        held = AsyncExitStack()
        await held.enter_async_context(self.engine.gate.writing(config.update_timeout_s, abort))
        self.engine.check_version(request.version)
        try:
            await self.receiver.start()
        except BaseException:
            await held.aclose()
            raise
        self._held, self._version, self._bytes = held, request.version, 0
        self._started = time.perf_counter()
        self._watchdog = asyncio.create_task(self._expire(config.update_timeout_s))

    def _require_started(self) -> AsyncExitStack:
        if self._held is None:
            raise ApiError(409, "no_update", "call /v1/weights/nccl/start first")
        return self._held

    async def update(self, request: NcclUpdateRequest) -> None:
        self._require_started()
        self._bytes += await self.receiver.update(request.update_info)

    async def finish(self, request: NcclFinishRequest) -> WeightUpdateResponse:
        self._require_started()
        engine = self.engine
        try:
            if engine.config.require_probe and request.probe is None:
                raise ApiError(
                    422, "probe_required", "this server requires a probe with each update"
                )
            diff = await self.receiver.finish(request.probe)
        except BaseException as exc:
            error = await self.receiver.abandon(exc)
            await self._release()
            if error is exc:
                raise
            raise error from exc
        transport = self.receiver.transport
        engine.gate.version = self._version
        engine.revision = f"{transport}-v{self._version}"
        # The serving weights now exist only in GPU memory.
        previous, engine.serving_dir = engine.serving_dir, None
        response = WeightUpdateResponse(
            policy_version=self._version,
            revision=engine.revision,
            transport=transport,
            bytes=self._bytes,
            duration_s=time.perf_counter() - self._started,
            probe_max_abs_diff=diff,
        )
        await self._release()
        engine.discard_staged(previous)
        return response

    async def _release(self) -> None:
        held, self._held = self._held, None
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        if held is not None:
            await held.aclose()

    async def _expire(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if self._held is not None:  # the trainer vanished mid-update
            await self.receiver.abandon(TimeoutError("device update never finished"))
            await self._release()
