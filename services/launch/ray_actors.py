"""One process of the stack as a Ray actor: the same `rlad` command as `rlad up` runs, watched.

The actor holds its role's resources (Ray placed it on a node that has them) and runs the
process as its child, its output in `<run folder>/logs/<name>.log`. When the process dies
the actor dies with it, so that Ray restarts the actor (`cluster.max_restarts`), on
another node if its node is gone; a restarted trainer rank passes `--resume`. A process
that exits with code 0 (the trainer at its last step) has finished: its actor stays, and
says so.

Servers register in the run's Redis and their clients follow the registry, so most
processes need no other actor's address. The few that do (the trainer's ranks above 0:
rank 0's rendezvous; a trainer that pushes over a device channel: its rollout server) read
it from the controller as they start, and again every few seconds: when it changed (that
actor came back elsewhere), the actor stops its process and dies, so that Ray starts it
again on the new address.

Ray is imported here and in `ray_up`, never at the top of a module that the services image
(which has no Ray) imports.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.launch.redis_server import wait_until_answers

RAY_MISSING = "install the ray extra: pip install 'rlad[ray]'"
NAMESPACE = "rlad"
WATCH_EVERY_S = 1.0
RENDEZVOUS = "rendezvous"  # an input that fills MASTER_ADDR/PORT rather than a flag


def import_ray() -> Any:
    """Ray, or a clear error when the optional extra is not installed."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


@dataclass
class ProcessSpec:
    """What one actor runs, plus the addresses it reads from other actors."""

    name: str  # the log file's name and, prefixed by the run, the actor's
    argv: list[str]  # `rlad ...` (RLAD + arguments) or another program (redis-server)
    folder: str  # the run folder: logs/ is under it
    cwd: str  # where it runs: relative paths of the config resolve from here
    env: dict[str, str] = field(default_factory=dict)
    # http: a server on a free port of its node, up once it answers /health;
    # redis: a redis-server on `port`, up once it answers PING;
    # rendezvous: trainer rank 0, which hosts the ranks' MASTER_ADDR/PORT.
    kind: Literal["http", "redis", "rendezvous"] | None = None
    port: int | None = None  # redis: the port clients were given
    password: str | None = None  # redis: the password it requires
    health_timeout_s: float = 600.0
    # How long a SIGTERM'd process may take before SIGKILL: a server's drain, a trainer's
    # last checkpoint.
    stop_grace_s: float = 30.0
    rendezvous_from: str | None = None  # trainer ranks > 0: the role of rank 0
    flags_from: dict[str, str] = field(default_factory=dict)  # flag -> a role's addresses
    resume_flag: bool = False  # add `--resume` when Ray restarted this actor


def rendezvous_env(address: str) -> dict[str, str]:
    host, port = address.rsplit(":", 1)
    return {"MASTER_ADDR": host, "MASTER_PORT": port}


class ProcessActor:
    """Runs one `ProcessSpec` and dies with its process (see the module docstring)."""

    def __init__(self, spec: ProcessSpec, controller: str) -> None:
        ray = import_ray()
        self.spec = spec
        self.controller = controller  # the deployment's actor, which knows every address
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.restarted = bool(context.was_current_actor_reconstructed)
        self.host = ray.util.get_node_ip_address()
        self.address: str | None = None
        self.exit_code: int | None = None
        self.stopping = False
        self.inputs = self._read_inputs()
        argv, env = list(spec.argv), dict(spec.env)
        if spec.kind == "http":
            port = free_port()
            self.address = f"http://{self.host}:{port}"
            argv += ["--host", self.host, "--port", str(port)]
        elif spec.kind == "redis":
            self.address = f"redis://:{spec.password}@{self.host}:{spec.port}/0"
        elif spec.kind == "rendezvous":
            self.address = f"{self.host}:{free_port()}"
            env |= rendezvous_env(self.address)
        for flag, addresses in self.inputs.items():
            if flag == RENDEZVOUS:
                env |= rendezvous_env(addresses[0])
            else:
                argv += [part for address in addresses for part in (flag, address)]
        if spec.resume_flag and self.restarted:
            argv.append("--resume")
        self.process = ManagedProcess(
            spec.name,
            argv,
            Path(spec.folder) / "logs" / f"{spec.name}.log",
            {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env},
            cwd=Path(spec.cwd),
        ).start()
        # A restart while this waits is Ray's to make: the actor dies with the process.
        if spec.kind == "http":
            self.process.wait_healthy(f"{self.address}/health", spec.health_timeout_s)
        elif spec.kind == "redis":
            assert self.address is not None
            wait_until_answers(self.address, self.process, spec.health_timeout_s)
        threading.Thread(target=self._watch, daemon=True, name="watch").start()

    def _read_inputs(self) -> dict[str, list[str]]:
        """The addresses this process is started with, as the deployment has them now."""
        ray = import_ray()
        wanted = dict(self.spec.flags_from)
        if self.spec.rendezvous_from:
            wanted[RENDEZVOUS] = self.spec.rendezvous_from
        if not wanted:
            return {}
        controller = ray.get_actor(self.controller, namespace=NAMESPACE)
        return {flag: ray.get(controller.addresses.remote(role)) for flag, role in wanted.items()}

    def _watch(self) -> None:
        """Die with the process, or once an address it was started with changed."""
        checked = time.monotonic()
        while True:
            time.sleep(WATCH_EVERY_S)
            if self.stopping:
                return
            if not self.process.alive():
                code = self.process.wait()
                if code == 0:
                    self.exit_code = 0
                    return
                # Not an exception: Ray restarts an actor whose worker process died.
                os._exit(1)
            if self.inputs and time.monotonic() - checked > 5 * WATCH_EVERY_S:
                checked = time.monotonic()
                try:
                    moved = self._read_inputs() != self.inputs
                except Exception:  # an input restarting: read again later
                    moved = False
                if moved:  # stopped, it may exit 0: it must not pass for finished
                    self.process.stop(self.spec.stop_grace_s)
                    os._exit(1)

    def address_of(self) -> str | None:
        """The server's URL, or the rendezvous `host:port` of trainer rank 0."""
        return self.address

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "node": self.node,
            "pid": self.process.pid,
            "alive": self.process.alive(),
            "exit_code": self.exit_code,
            "restarted": self.restarted,
            "address": self.address,
        }

    def stop(self) -> int | None:
        """Stop the process (SIGTERM: a server drains, a trainer checkpoints, a worker
        finishes its batch), SIGKILL after `stop_grace_s`."""
        self.stopping = True
        self.process.stop(self.spec.stop_grace_s)
        return self.process.proc.returncode if self.process.proc else None
