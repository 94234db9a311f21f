"""The trainer's end of the control plane of a device weight push (GPU servers only).

`NcclSyncClient` speaks a server's `/v1/weights/nccl/{init,start,update,finish}` routes.
It is the `VLLMWeightSyncClient` that vLLM's `NCCLTrainerWeightTransferEngine` drives for
a vLLM server, and the trainer drives it itself for CUDA IPC to a transformers server
(`trainer.device_push`). Set `version` and `probe` before each push, read `last_response`
after it:

    sync = NcclSyncClient(url, api_key)
    engine = NCCLTrainerWeightTransferEngine.trainer_init(
        NCCLTrainerInitInfo(master_address=ip, master_port=port, world_size=2, rank=0),
        client=sync, source=ModuleSource(model))
    sync.version, sync.probe = 7, make_probe(model, ids)
    engine.send_weights()

The server's end, with the version gate and the probe, is `rollout_server.nccl`.
"""

from __future__ import annotations

from typing import Any

import httpx

from services.common.protocol import (
    NcclFinishRequest,
    NcclInitRequest,
    NcclStartRequest,
    NcclUpdateRequest,
    WeightProbe,
    WeightUpdateResponse,
)


class NcclSyncClient:
    """Trainer side: vLLM's `VLLMWeightSyncClient` over this server's device-push routes."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.version: int | None = None
        self.probe: WeightProbe | None = None
        self.last_response: WeightUpdateResponse | None = None

    def routes_enabled(self) -> bool:
        """Whether the server takes device pushes (`--nccl-weight-transfer`): its POST-only
        routes answer a GET with 405 when they exist, 404 when they do not."""
        return self._http.get("/v1/weights/nccl/init").status_code == 405

    def _post(self, path: str, body: Any) -> httpx.Response:
        response = self._http.post(f"/v1/weights/nccl/{path}", content=body.model_dump_json())
        if response.status_code >= 400:
            raise RuntimeError(
                f"{self.url}: device push {path} refused: {response.status_code} {response.text}"
            )
        return response

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("init", NcclInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        if self.version is None:
            raise ValueError("set NcclSyncClient.version before send_weights()")
        self._post("start", NcclStartRequest(version=self.version))

    def update_weights(self, update_info: Any) -> None:
        self._post("update", NcclUpdateRequest(update_info=dict(update_info)))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        response = self._post("finish", NcclFinishRequest(probe=self.probe))
        self.last_response = WeightUpdateResponse.model_validate_json(response.content)

    def close(self) -> None:
        self._http.close()
