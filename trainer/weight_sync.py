"""After each step, the trainer's weights reach every rollout server as the new version.

`WeightSync.push` is collective: every rank calls it, because at ZeRO-3 the full
parameters exist only while all ranks gather them. Rank 0 decides the transport once, at
the first push (`trainer.push_transport`), and tells the other ranks how to take part:

- `http` / `file`: the full state dict, gathered bucket by bucket to the CPU in fp32,
  goes through `RolloutClient.push_weights`;
- `nccl` / `cuda_ipc` (`trainer.device_push`): the buckets, in the training dtype, go from
  GPU memory to the servers' GPUs, one at a time;
- `auto`: the device path the servers accept when the trainer runs on a GPU (`nccl` for
  vLLM servers, `cuda_ipc` for transformers servers, each started with
  `--nccl-weight-transfer`), else `http`; a device handshake that fails falls back to
  `http`, with a warning that says why.

Every transport ends with the server's probe check, and any refusal raises here and stops
the trainer, loudly; the server keeps its previous weights (a vLLM server that cannot
restore them after a failed NCCL push refuses to generate instead, see
`rollout_server.nccl`).

A rollout server that restarts serves its base weights as version 0 until it gets weights
again. While the trainer waits for groups, rank 0 asks each server's version every
`CATCH_UP_INTERVAL_S` (`behind`), and the ranks push the weights last pushed, as their
version, to the servers found behind (`catch_up`), over HTTP or the shared file: a server
that restarted has no device channel left to take them from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import torch
import torch.distributed as dist

from services.clients.rollout import RolloutClient, RolloutServerError
from services.common.protocol import WeightProbe, WeightUpdateResponse
from services.config.run import RunConfig
from services.queue.registry import ServerRegistry, serving_urls
from services.weights.nccl_client import NcclSyncClient
from trainer.deepspeed_setup import full_state_dict
from trainer.device_push import CudaIpcSender, VllmNcclSender
from trainer.weight_buckets import iter_buckets, plan

log = logging.getLogger(__name__)
MiB = 1024 * 1024
DEVICE_TRANSPORT = {"vllm": "nccl", "hf": "cuda_ipc"}  # server backend -> its device path
Transport = Literal["nccl", "cuda_ipc", "http", "file"]
CATCH_UP_INTERVAL_S = 2.0  # how often rank 0 asks the servers their version while waiting
VERSION_TIMEOUT_S = 1.0  # a server slower than this to say its version is asked again later


@dataclass
class PushReport:
    """What one push did, for the step's metrics."""

    seconds: float
    bytes: int
    probe_max_abs_diff: float | None

    def metrics(self) -> dict[str, float]:
        metrics = {"push_time_s": self.seconds, "push_gb": self.bytes / 1e9}
        if self.probe_max_abs_diff is not None:
            metrics["push_probe_diff"] = self.probe_max_abs_diff
        return metrics


class WeightSync:
    """The trainer's side of the weight sync, one per rank; rank 0 talks to the servers."""

    def __init__(
        self,
        engine: Any,
        run: RunConfig,
        urls: list[str],
        api_key: str | None,
        is_main: bool,
        registry: ServerRegistry | None = None,
    ) -> None:
        """`urls`: the rollout servers; or, with a `registry`, the servers registered
        there at each push and each check of who is behind (rank 0 reads it)."""
        self.engine = engine
        self.config = run.trainer
        # The file transport writes where the rollout servers may read (their weights_dir;
        # a run config defaults it to <run folder>/weights).
        self.weights_dir = run.rollout_server.weights_dir or run.folder / "weights"
        self.urls = urls
        self.registry = registry
        self.api_key = api_key
        self.is_main = is_main
        # vLLM's NCCL group holds the trainer and each of the server's tensor-parallel workers.
        self.vllm_workers = run.rollout_server.tensor_parallel_size
        self.buckets = plan(engine.module, self.config.push_bucket_mb * MiB)
        self.loop = asyncio.new_event_loop()
        self.rollout = (
            RolloutClient(
                urls,
                api_key=api_key,
                deadline_s=self.config.push_timeout_s,
                follows_registry=registry is not None,
            )
            if self.enabled
            else None
        )
        self.transport: Transport | None = None  # rank 0's choice
        self.sender: CudaIpcSender | VllmNcclSender | None = None
        # What the other ranks need to know of it: whether the buckets go to the servers
        # (else a full state dict does), and how many times a push walks them.
        self.device_path = False
        self.passes = 1
        self.connected = False
        # Rank 0: the version the servers took last, with its probe, and when they were
        # last asked for their version.
        self.pushed: tuple[int, WeightProbe | None] | None = None
        self.asked_at = 0.0

    @property
    def enabled(self) -> bool:
        """Whether there are servers to push to (the same on every rank)."""
        return bool(self.urls) or self.registry is not None

    def _follow_registry(self) -> None:
        """Rank 0 with a registry: the servers to push to are the ones registered now and
        not draining (one that joins later is caught up by `behind` / `catch_up`)."""
        if self.registry is None or not self.is_main:
            return
        assert self.rollout is not None
        self.urls = serving_urls(self.registry.servers("rollout"))
        self.rollout.set_urls(self.urls)

    def served_version(self) -> int:
        """The newest version any server serves (rank 0): the next push must be above it."""
        assert self.rollout is not None
        self._follow_registry()
        infos = [self.loop.run_until_complete(self.rollout.info(url)) for url in self.urls]
        return max(info.policy_version or 0 for info in infos)

    # ------------------------------------------------------------ choosing the transport

    def _connect(self) -> None:
        """Rank 0 picks the transport and shakes hands; every rank learns how to take part
        (the gathers of the device path or of a full state dict; a vLLM NCCL push walks the
        buckets once per server)."""
        choice = torch.zeros(2, dtype=torch.long, device=self.engine.device)
        if self.is_main:
            self.transport = self._choose()
            passes = len(self.urls) if self.transport == "nccl" else 1
            choice[0], choice[1] = int(self.transport in DEVICE_TRANSPORT.values()), passes
            log.info("weights go to %d rollout server(s) over %s", len(self.urls), self.transport)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(choice, src=0)
        self.device_path, self.passes = bool(choice[0]), int(choice[1])
        self.connected = True

    def _choose(self) -> Transport:
        requested = self.config.push_transport
        if requested in ("http", "file"):
            return requested
        if self.registry is not None:
            # A device channel is opened once, to a fixed set of servers.
            if requested == "auto":
                return "http"
            raise ValueError(
                f"trainer.push_transport {requested} needs fixed --rollout-url servers, not "
                "the registry: use http or file with a registry"
            )
        if self.engine.device.type != "cuda":
            if requested == "auto":
                return "http"
            raise ValueError(f"trainer.push_transport {requested} needs the trainer on a GPU")
        try:
            return self._handshake(requested)
        except Exception as exc:
            if requested != "auto":
                raise
            log.warning("no device push to the rollout servers (%s); pushing over http", exc)
            return "http"

    def _handshake(self, requested: str) -> Transport:
        clients = [
            NcclSyncClient(url, self.api_key, self.config.push_timeout_s) for url in self.urls
        ]
        try:
            return self._open_device_path(requested, clients)
        except BaseException:
            for client in clients:
                client.close()
            raise

    def _open_device_path(self, requested: str, clients: list[NcclSyncClient]) -> Transport:
        assert self.rollout is not None
        closed = [c.url for c in clients if not c.routes_enabled()]
        if closed:
            raise RuntimeError(
                f"{', '.join(closed)} take no device pushes: start them with "
                "--nccl-weight-transfer (and give the trainer their RLAD_API_KEY)"
            )
        infos = [self.loop.run_until_complete(self.rollout.info(url)) for url in self.urls]
        paths = {DEVICE_TRANSPORT[info.backend] for info in infos}
        wanted = paths.pop() if requested == "auto" and len(paths) == 1 else requested
        wrong = [i.backend for i in infos if DEVICE_TRANSPORT[i.backend] != wanted]
        if wrong or wanted == "auto":
            raise RuntimeError(
                f"push_transport {requested}: the servers' backends are "
                f"{[i.backend for i in infos]} (nccl takes vllm servers, cuda_ipc hf servers)"
            )
        if wanted == "cuda_ipc":
            self.sender = CudaIpcSender(clients, self.buckets, self.engine.device)
            return "cuda_ipc"
        self.sender = VllmNcclSender(
            clients, self.buckets, self.config.zero_stage, self.vllm_workers
        )
        return "nccl"

    # ------------------------------------------------------------ pushing

    def push(self, version: int, probe: WeightProbe | None) -> PushReport | None:
        """Send the weights as `version` (collective); rank 0 returns what it did."""
        self._follow_registry()
        if not self.connected:
            self._connect()
        started = time.perf_counter()
        zero_stage = self.config.zero_stage
        if not self.is_main:
            if zero_stage == 3:  # only ZeRO-3's gathers need the other ranks
                self._join_gathers()
            return None
        responses = self._send(version, probe)
        if not responses:
            log.warning("no rollout server registered: version %d reaches them later", version)
        self.pushed = (version, probe)
        return PushReport(
            seconds=time.perf_counter() - started,
            bytes=responses[0].bytes if responses else 0,
            probe_max_abs_diff=responses[0].probe_max_abs_diff if responses else None,
        )

    def _join_gathers(self) -> None:
        """A rank other than 0: gather what rank 0 gathers, in the same order."""
        if not self.device_path:
            full_state_dict(self.engine, self.config.zero_stage)
            return
        for _ in range(self.passes):
            for _bucket in iter_buckets(self.buckets, self.config.zero_stage):
                pass

    def _send(self, version: int, probe: WeightProbe | None) -> list[WeightUpdateResponse]:
        if isinstance(self.sender, CudaIpcSender):
            buckets = iter_buckets(self.buckets, self.config.zero_stage)
            return self.sender.send(buckets, version, probe)
        if isinstance(self.sender, VllmNcclSender):
            return self.sender.send(version, probe)
        assert self.rollout is not None and self.transport in ("http", "file")
        state = full_state_dict(self.engine, self.config.zero_stage)  # collective at ZeRO-3
        if not self.urls:  # a registry with no server yet
            return []
        response = self.loop.run_until_complete(
            self.rollout.push_weights(
                state,
                version,
                probe=probe,
                transport=self.transport,
                shared_dir=self.weights_dir,
            )
        )
        return [response]

    # ------------------------------------------------------------ restarted servers

    def behind(self) -> list[str]:
        """Rank 0, at most every `CATCH_UP_INTERVAL_S`: the servers that answer with a
        version below the one last pushed. Elsewhere, or before the first push: none."""
        now = time.monotonic()
        if self.rollout is None or self.pushed is None or now - self.asked_at < CATCH_UP_INTERVAL_S:
            return []
        self.asked_at = now
        self._follow_registry()
        served = self.loop.run_until_complete(self.rollout.served_versions(VERSION_TIMEOUT_S))
        version = self.pushed[0]
        return [url for url, v in served.items() if v is not None and v < version]

    def catch_up(self, urls: list[str]) -> None:
        """Collective: push the weights last pushed, as their version, to `urls` (rank 0's;
        the other ranks join the gathers at ZeRO-3). A server that cannot be reached now is
        asked again at the next check; one that refuses the weights stops the trainer, as a
        refused push does."""
        if not self.is_main:
            if self.config.zero_stage == 3:
                full_state_dict(self.engine, self.config.zero_stage)
            return
        assert self.rollout is not None and self.pushed is not None
        version, probe = self.pushed
        log.warning(
            "%s serve(s) a version below %d (restarted?): pushing version %d to them again",
            ", ".join(urls), version, version,
        )  # fmt: skip
        state = full_state_dict(self.engine, self.config.zero_stage)
        push = self.rollout.push_weights(
            state,
            version,
            probe=probe,
            transport="file" if self.transport == "file" else "http",
            shared_dir=self.weights_dir,
            urls=urls,
        )
        try:
            self.loop.run_until_complete(push)
        except (RolloutServerError, httpx.TransportError) as exc:
            if isinstance(exc, RolloutServerError) and exc.status != 503:
                raise
            log.warning("could not push version %d again (%s); asking again shortly", version, exc)

    def close(self) -> None:
        if self.sender is not None:
            for client in self.sender.clients:
                client.close()
        if self.rollout is not None:
            self.loop.run_until_complete(self.rollout.aclose())
        self.loop.close()
