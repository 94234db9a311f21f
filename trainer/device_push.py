"""Weight pushes that stay on the GPU, one bucket at a time (rank 0's side).

- `CudaIpcSender`: transformers rollout servers on this host map one bucket buffer of
  the trainer's GPU (`services.weights.cuda_ipc`); each bucket is packed into it and each
  server copies it out before the next one is packed.
- `VllmNcclSender`: vLLM rollout servers join an NCCL group with the trainer (vLLM's
  `NCCLTrainerWeightTransferEngine`), one group per server, and receive broadcasts.

Both drive the server's `/v1/weights/nccl/*` routes through `NcclSyncClient`: `start`
takes the server's version gate, `finish` sends the probe, and the new version serves
only once the probe matches. The buckets come from `trainer.weight_buckets` already
gathered (at ZeRO-3 every rank walks them, the other ranks without sending).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import torch

from services.common.protocol import WeightProbe, WeightUpdateResponse
from services.common.runtime import free_port
from services.weights.cuda_ipc import CHECK_BYTES, buffer_bytes, check_pattern, layout, pack, share
from services.weights.nccl_client import NcclSyncClient
from trainer.weight_buckets import Entry, iter_buckets


def _responses(clients: list[NcclSyncClient]) -> list[WeightUpdateResponse]:
    """Each server's answer to `finish`: its verified new version."""
    responses = []
    for client in clients:
        assert client.last_response is not None, "a push ended without finish"
        responses.append(client.last_response)
    return responses


class CudaIpcSender:
    """Rank 0's CUDA IPC pushes: one bucket buffer on its GPU, mapped by every server."""

    def __init__(
        self, clients: list[NcclSyncClient], buckets: list[list[Entry]], device: torch.device
    ) -> None:
        self.clients = clients
        self.slots = [layout((e.names[0], e.param.dtype, e.shape) for e in b) for b in buckets]
        size = max([CHECK_BYTES, *(buffer_bytes(s) for s in self.slots)])
        # One buffer for the whole run: each server maps its handle once, at the handshake.
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        pattern = torch.tensor(check_pattern(), dtype=torch.uint8, device=device)
        self.buffer[:CHECK_BYTES].copy_(pattern)
        torch.cuda.synchronize(device)
        shared = share(self.buffer)
        for client in clients:
            client.init_weight_transfer_engine({"cuda_ipc": shared})

    def send(
        self, buckets: Iterator[list[Entry]], version: int, probe: WeightProbe | None
    ) -> list[WeightUpdateResponse]:
        started: list[NcclSyncClient] = []
        try:
            for client in self.clients:
                client.version, client.probe = version, probe
                client.start_weight_update()
                started.append(client)
            for slots, bucket in zip(self.slots, buckets, strict=True):
                pack(self.buffer, slots, [e.value() for e in bucket])
                torch.cuda.synchronize(self.buffer.device)  # the servers read it next
                for client in self.clients:
                    client.update_weights({"slots": [s.model_dump() for s in slots]})
        except BaseException:
            # `finish` releases each started server's gate; with parameters missing it
            # refuses the update, and the weights that served keep serving.
            for client in started:
                with contextlib.suppress(Exception):
                    client.finish_weight_update()
            raise
        for client in self.clients:
            client.finish_weight_update()
        return _responses(self.clients)


def _address_towards(url: str) -> str:
    """This host's address on the route to `url` (where the server can reach the trainer)."""
    host = urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])


def _vllm_source(buckets: list[list[Entry]], zero_stage: int) -> Any:
    """A vLLM `WeightSource` that yields the trainer's parameters bucket by bucket, gathered."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class ZeroSource(WeightSource):  # type: ignore[misc]
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(e.names[0], e.param.dtype, e.shape) for b in buckets for e in b]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in iter_buckets(buckets, zero_stage):
                for entry in bucket:
                    yield entry.names[0], entry.value()

    return ZeroSource()


class VllmNcclSender:
    """Rank 0's NCCL pushes to vLLM servers: vLLM's trainer engine, one group per server."""

    def __init__(
        self,
        clients: list[NcclSyncClient],
        buckets: list[list[Entry]],
        zero_stage: int,
        workers_per_server: int,
    ) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.clients = clients
        self.engines = [
            NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(
                    master_address=_address_towards(client.url),
                    master_port=free_port(),
                    world_size=1 + workers_per_server,
                    rank=0,
                ),
                client=client,
                source=_vllm_source(buckets, zero_stage),
            )
            for client in clients
        ]

    def send(self, version: int, probe: WeightProbe | None) -> list[WeightUpdateResponse]:
        """One broadcast per server; each walks (and at ZeRO-3 gathers) every bucket."""
        for client, engine in zip(self.clients, self.engines, strict=True):
            client.version, client.probe = version, probe
            engine.send_weights()
        return _responses(self.clients)
