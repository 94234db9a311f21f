"""vLLM's native NCCL weight transfer, for GPU clusters only (`--nccl-weight-transfer`).

Optional: nothing else imports this module unless a vLLM server runs with the flag on a
machine with CUDA. This is the server's end of the control plane; the trainer's end is
`services.weights.nccl_client.NcclSyncClient`.

`NcclUpdates` serves `POST /v1/weights/nccl/{init,start,update,finish}` and holds the
version gate from `start` to `finish`, so NCCL updates keep the guarantees of the file and
HTTP transports: new requests wait, in-flight ones finish or abort, the probe must match
before the version changes, and a failure restores the last weights kept on disk. A
watchdog releases the gate if `finish` never comes.

NCCL weights exist only in GPU memory; until the next file or HTTP update, a failed
update cannot restore them and answers 500 (see `VLLMRolloutEngine.restore_after`).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

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
from services.weights.probe import check_probe

if TYPE_CHECKING:
    from rollout_server.vllm_backend import VLLMRolloutEngine


class NcclUpdates:
    def __init__(self, engine: VLLMRolloutEngine) -> None:
        self.engine = engine
        self._held: AsyncExitStack | None = None
        self._version = 0
        self._bytes = 0
        self._started = 0.0
        self._watchdog: asyncio.Task[None] | None = None

    async def init(self, request: NcclInitRequest) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.engine.llm.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info=request.init_info)
        )

    async def start(self, request: NcclStartRequest) -> None:
        if self._held is not None:
            raise ApiError(409, "update_in_progress", "an NCCL update is already running")
        self.engine.check_version(request.version)
        config = self.engine.config
        abort = self.engine._abort_in_flight if config.in_flight_policy == "abort" else None
        held = AsyncExitStack()
        await held.enter_async_context(self.engine.gate.writing(config.update_timeout_s, abort))
        self.engine.check_version(request.version)
        try:
            await self.engine.llm.start_weight_update()
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
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._require_started()
        info = request.update_info
        for dtype, shape in zip(info.get("dtype_names", []), info.get("shapes", []), strict=False):
            size = torch.empty((), dtype=getattr(torch, str(dtype))).element_size()
            self._bytes += size * int(torch.Size(shape).numel())
        await self.engine.llm.update_weights(WeightTransferUpdateRequest(update_info=info))

    async def finish(self, request: NcclFinishRequest) -> WeightUpdateResponse:
        self._require_started()
        engine = self.engine
        try:
            await engine.llm.finish_weight_update()
            if not await engine.llm.reset_prefix_cache():
                raise RuntimeError("prefix cache reset refused: requests still running")
            probe: WeightProbe | None = request.probe
            diff = check_probe(probe, await engine.score(probe.token_ids)) if probe else None
        except BaseException as exc:
            error = await engine.restore_after(exc)
            await self._release()
            if error is exc:
                raise
            raise error from exc
        engine.gate.version = self._version
        engine.revision = f"nccl-v{self._version}"
        engine.serving_dir = None  # the serving weights now exist only in GPU memory
        response = WeightUpdateResponse(
            policy_version=self._version,
            revision=engine.revision,
            transport="nccl",
            bytes=self._bytes,
            duration_s=time.perf_counter() - self._started,
            probe_max_abs_diff=diff,
        )
        await self._release()
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
            await self.engine.restore_after(TimeoutError("NCCL update never finished"))
            await self._release()
