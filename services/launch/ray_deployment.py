"""The deployment of one run on Ray: a named, detached controller actor that holds every
process actor of the stack, starts them in order, changes a role's replica count
(`rlad scale`) and stops them all.

Named `rlad:<run>:controller` in the `rlad` namespace, so that `rlad scale` (another
driver) finds it. The servers it starts register in the run's Redis (`RLAD_REGISTER`,
services/queue/registry.py) and their clients follow the registry: a teacher added is
scored with within seconds, one removed drains (SIGTERM: it says so, its clients move
off, it answers what it holds and withdraws), and a server that Ray restarted elsewhere
is found at its new address without restarting anyone. Only the trainer reads addresses
from the controller (services/launch/ray_actors.py): rank 0's rendezvous, and the rollout
server's URL when it pushes over a device channel, which is opened to one fixed server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from services.config.cluster import SCALABLE_ROLES, ClusterConfig, RoleResources
from services.config.run import RunConfig
from services.config.servers import ServerConfig
from services.launch.ray_actors import NAMESPACE, ProcessActor, ProcessSpec, import_ray
from services.launch.up import RLAD, vllm_cpu_env
from services.queue.registry import REGISTRY, Role

# A stopped server's drain is bounded by its drain_timeout_s; this much more lets uvicorn
# and its engine shut down before SIGKILL.
SHUTDOWN_S = 15.0


def controller_name(run: str) -> str:
    return f"rlad:{run}:controller"


def deploys_teachers(run: RunConfig) -> bool:
    """Whether the deployment runs teacher servers of its own (the scorer scores and the
    config names no remote `teacher_urls` pools)."""
    return run.scorer.mode == "teacher" and not run.teacher_urls


def check_scalable(run: RunConfig, role: str) -> None:
    """Refuse, saying why, a role that `rlad scale` cannot change in this run."""
    if role not in SCALABLE_ROLES:
        raise ValueError(f"cannot scale {role!r}: scale one of {', '.join(SCALABLE_ROLES)}")
    if role == "teacher" and not deploys_teachers(run):
        raise ValueError(
            f"run {run.name!r} runs no teacher servers of its own: its scorer passes groups "
            "through, or scores with the config's teacher_urls"
        )


def trainer_follows_registry(run: RunConfig) -> bool:
    """Whether the trainer's weights go over http or a shared file, so that it can push to
    whichever rollout server is registered; a device channel (NCCL, CUDA IPC) is opened
    once, to the server the trainer was started with."""
    transport = run.trainer.push_transport
    on_cpu = run.cluster.trainer.num_gpus == 0
    return transport in ("http", "file") or (transport == "auto" and on_cpu)


@dataclass
class Plan:
    """What the controller deploys: the run, where its files are, and the environment each
    role gets on top of its own (the CPU placement of a local Ray)."""

    run: RunConfig
    config_path: str
    cwd: str
    redis_url: str | None  # None: start a redis-server on `head_node`
    redis_port: int
    redis_host: str
    redis_password: str
    api_key: str  # RLAD_API_KEY of every server and client: they listen beyond loopback
    head_node: str
    placement: dict[str, dict[str, str]]
    resume: bool


class Controller:
    """Holds the deployment; methods run on a thread pool (the actors call back into it)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.run = plan.run
        self.cluster: ClusterConfig = plan.run.cluster
        self.name = controller_name(plan.run.name)
        self.lock = threading.Lock()
        self.actors: dict[str, list[tuple[str, Any]]] = {}  # role -> [(name, handle)]
        self.next_index: dict[str, int] = {}
        self.trainer_group: Any = None
        self.redis_url = plan.redis_url

    # ------------------------------------------------------------ start

    def deploy(self) -> str:
        """Start the stack in order; returns the Redis URL the processes use."""
        ray = import_ray()
        if self.redis_url is None:
            self._start_redis()
        # The servers load their models side by side; their clients start once they serve.
        servers = {"rollout": 1}
        if deploys_teachers(self.run):
            servers["teacher"] = self.cluster.teacher.replicas
        self._resize(servers)
        clients = {"scorer": self.cluster.scorer, "rollout-worker": self.cluster.rollout_worker}
        self._resize({role: resources.replicas for role, resources in clients.items()})
        self._start_trainer()
        ray.get([handle.status.remote() for _, handle in self.actors["trainer"]])
        assert self.redis_url is not None
        return self.redis_url

    def _start_redis(self) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from services.launch.redis_server import redis_server_argv

        folder = self.run.folder / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        spec = self._spec(
            "redis",
            redis_server_argv(
                folder, self.plan.redis_host, self.plan.redis_port, self.plan.redis_password
            ),
            kind="redis",
            port=self.plan.redis_port,
            password=self.plan.redis_password,
        )
        # On the head node, where its append-only file is: it comes back on the same
        # port and file, so every process keeps its URL.
        head = NodeAffinitySchedulingStrategy(self.plan.head_node, soft=False)
        actor = self._actor(spec, RoleResources(num_cpus=0), head).remote(spec, self.name)
        self.redis_url = import_ray().get(actor.address_of.remote())
        self.actors["redis"] = [("redis", actor)]

    def _start_trainer(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = import_ray()
        resources = self.cluster.trainer
        per_node = resources.ranks_per_node
        node_bundle = {key: value * per_node for key, value in resources.ray_bundle().items()}
        strategy = "STRICT_PACK" if resources.nodes == 1 else resources.strategy
        # One bundle per node, so that a node's ranks share it and ZeRO spans the nodes.
        group = placement_group([node_bundle] * resources.nodes, strategy=strategy)
        try:
            ray.get(group.ready(), timeout=self.cluster.health_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the trainer's {resources.nodes} x {node_bundle} do not fit on the cluster "
                f"({strategy}); free resources: {ray.available_resources()}"
            ) from None
        self.trainer_group = group
        ranks: list[tuple[str, Any]] = []
        self.actors["trainer"] = ranks
        for rank in range(resources.world_size):
            env = self._env(
                self.plan.placement.get("trainer", {}),
                {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank % per_node),
                    "WORLD_SIZE": str(resources.world_size),
                },
            )
            args = ["train", *self._common(), *(["--resume"] if self.plan.resume else [])]
            follows = trainer_follows_registry(self.run)
            spec = self._spec(
                f"trainer-{rank}",
                [*RLAD, *args, *(["--rollout-url", REGISTRY] if follows else [])],
                env=env,
                kind="rendezvous" if rank == 0 else None,
                rendezvous_from=None if rank == 0 else "trainer-0",
                flags_from={} if follows else {"--rollout-url": "rollout"},
                resume_flag=not self.plan.resume,
            )
            strategy_of_rank = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank // per_node
            )
            actor = self._actor(spec, resources, strategy_of_rank).remote(spec, self.name)
            ranks.append((spec.name, actor))
            if rank == 0:  # the other ranks read its rendezvous address
                ray.get(actor.address_of.remote())

    # ------------------------------------------------------------ replicas

    def _common(self) -> list[str]:
        return ["--config", self.plan.config_path]

    def _env(self, *extra: dict[str, str]) -> dict[str, str]:
        """The Redis URL by the environment: it may carry a password, which a command line
        would show to every user of the node."""
        assert self.redis_url is not None
        merged = {"REDIS_URL": self.redis_url}
        for more in extra:
            merged |= more
        return merged

    def _server_spec(self, name: str, role: Role, server: ServerConfig) -> ProcessSpec:
        """`rlad serve-<role>`, registered in the run's Redis (named by the environment,
        like REDIS_URL) and drained when stopped."""
        assert self.redis_url is not None
        env = {
            "RLAD_REGISTER": self.redis_url,
            **vllm_cpu_env(server),
            **self.plan.placement.get(role, {}),
        }
        argv = [*RLAD, f"serve-{role}", "--config", self.plan.config_path]
        grace = server.drain_timeout_s + SHUTDOWN_S
        return self._spec(name, argv, env=env, kind="http", stop_grace_s=grace)

    def _role_spec(self, role: str, index: int) -> tuple[ProcessSpec, RoleResources]:
        name = f"{role}-{index}"
        if role == "rollout":
            spec = self._server_spec(name, "rollout", self.run.rollout_server)
            return spec, self.cluster.rollout_server
        if role == "teacher":
            assert self.run.teacher_server is not None  # RunConfig: a teacher when needed
            spec = self._server_spec(name, "teacher", self.run.teacher_server)
            return spec, self.cluster.teacher
        if role == "scorer":
            teachers = [  # the config's remote pools, NAME=URL, as `rlad up` passes them
                flag
                for pool in self.run.teacher_urls
                for url in pool.urls
                for flag in ("--teacher-url", f"{pool.name}={url}")
            ]
            if deploys_teachers(self.run):
                teachers = ["--teacher-url", REGISTRY]
            argv = [*RLAD, "scorer", *self._common(), *teachers, "--rollout-url", REGISTRY]
            return self._spec(name, argv, env=self._env()), self.cluster.scorer
        if role == "rollout-worker":
            argv = [*RLAD, "rollout-worker", *self._common(), "--rollout-url", REGISTRY]
            return self._spec(name, argv, env=self._env()), self.cluster.rollout_worker
        raise ValueError(f"no role {role!r}: teacher, rollout-worker or scorer")

    def _spec(self, name: str, argv: list[str], **fields: Any) -> ProcessSpec:
        env = {"RLAD_API_KEY": self.plan.api_key, **fields.pop("env", {})}
        return ProcessSpec(
            name=name,
            argv=argv,
            env=env,
            folder=str(self.run.folder),
            cwd=self.plan.cwd,
            health_timeout_s=self.cluster.health_timeout_s,
            **fields,
        )

    def _actor(
        self, spec: ProcessSpec, resources: RoleResources, scheduling: Any = "DEFAULT"
    ) -> Any:
        ray = import_ray()
        return ray.remote(ProcessActor).options(
            name=f"rlad:{self.run.name}:{spec.name}",
            namespace=NAMESPACE,
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            resources=resources.resources or None,
            max_restarts=self.cluster.max_restarts,
            max_task_retries=-1,  # calls wait for a restarting actor
            scheduling_strategy=scheduling,
        )

    def scale(self, role: str, replicas: int) -> list[str]:
        """Start or stop replicas of `role` until it has `replicas`; returns their names.
        Returns once the new ones are ready (a server answers /health and registers at
        once: its clients take it at their next look) and the removed ones have stopped (a
        server drained: its clients moved off, its requests in flight were answered)."""
        return self._resize({role: replicas})[role]

    def _resize(self, wanted: dict[str, int]) -> dict[str, list[str]]:
        """`scale` for several roles at once: their new replicas start side by side."""
        if any(replicas < 0 for replicas in wanted.values()):
            raise ValueError("replicas must be >= 0")
        plans: dict[str, tuple[list[tuple[str, Any]], list[tuple[str, Any]]]] = {}
        for role, replicas in wanted.items():
            with self.lock:
                current = list(self.actors.get(role, []))
            started: list[tuple[str, Any]] = []
            while len(current) + len(started) < replicas:
                index = self.next_index.get(role, 0)
                self.next_index[role] = index + 1
                spec, resources = self._role_spec(role, index)
                actor = self._actor(spec, resources).remote(spec, self.name)
                started.append((spec.name, actor))
            plans[role] = current, started
        self._wait_started(plans)
        removed: list[tuple[str, Any]] = []
        with self.lock:
            for role, (current, started) in plans.items():
                self.actors[role] = current[: wanted[role]] + started
                removed += current[wanted[role] :]
        self._stop(removed)
        with self.lock:
            return {role: [name for name, _ in self.actors[role]] for role in wanted}

    def _wait_started(self, plans: dict[str, tuple[list[Any], list[tuple[str, Any]]]]) -> None:
        """Wait until every new replica is ready; one that Ray cannot place (or that never
        answers) within `health_timeout_s` is stopped, and the error says what it asked for
        and what the cluster has free, rather than `rlad scale` waiting for ever."""
        ray = import_ray()
        new = [(role, actor) for role, (_, started) in plans.items() for _, actor in started]
        ready = [actor.address_of.remote() for _, actor in new]
        timeout = self.cluster.health_timeout_s
        _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout)
        if not pending:
            ray.get(ready)  # raises a replica's own failure, if one failed
            return
        for _, actor in new:
            ray.kill(actor, no_restart=True)
        asked = {role: self._role_spec(role, 0)[1].ray_bundle() for role, _ in new}
        raise RuntimeError(
            f"{len(pending)} new replica(s) not ready after {timeout:.0f}s "
            f"(cluster.health_timeout_s): each asks {asked}; the cluster has "
            f"{ray.available_resources()} free. Add nodes, or ask for less "
            "(cluster.<role>.num_cpus / num_gpus / resources)."
        )

    def _stop(self, actors: list[tuple[str, Any]]) -> None:
        """SIGTERM every process at once and wait for each (servers drain side by side),
        then end the actors."""
        ray = import_ray()
        stopping = [(actor, actor.stop.remote()) for _, actor in actors]
        deadline = time.monotonic() + self._stop_timeout_s()
        for actor, stopped in stopping:
            # Dead already, or not answering: killed below either way.
            with contextlib.suppress(Exception):
                ray.get(stopped, timeout=max(deadline - time.monotonic(), 1.0))
            ray.kill(actor, no_restart=True)

    def _stop_timeout_s(self) -> float:
        """The longest one `ProcessActor.stop` may take (a server's drain and shut-down,
        else the default grace), with room for the SIGKILL after it."""
        servers = [s for s in (self.run.rollout_server, self.run.teacher_server) if s]
        graces = [ProcessSpec.stop_grace_s, *(s.drain_timeout_s + SHUTDOWN_S for s in servers)]
        return max(graces) + 10.0

    # ------------------------------------------------------------ queries

    def addresses(self, role: str) -> list[str]:
        """The current addresses of `role`'s replicas, or of the one actor of that name
        (waits for one that is restarting)."""
        ray = import_ray()
        with self.lock:
            actors = list(self.actors.get(role, []))
            if not actors:
                named = [a for replicas in self.actors.values() for a in replicas]
                actors = [(name, actor) for name, actor in named if name == role]
        return list(ray.get([actor.address_of.remote() for _, actor in actors]))

    def replicas(self) -> dict[str, list[str]]:
        with self.lock:
            return {role: [name for name, _ in actors] for role, actors in self.actors.items()}

    def status(self) -> list[dict[str, Any]]:
        """Every actor's process: its node, pid, whether it runs, was restarted, exited."""
        ray = import_ray()
        with self.lock:
            actors = [(role, a) for role, named in self.actors.items() for _, a in named]
        rows = ray.get([actor.status.remote() for _, actor in actors])
        return [{"role": role, **row} for (role, _), row in zip(actors, rows, strict=True)]

    def trainer_exit_code(self) -> int | None:
        """0 once the trainer finished (rank 0's process exited cleanly), else None."""
        ray = import_ray()
        return ray.get(self.actors["trainer"][0][1].status.remote())["exit_code"]

    def stop_roles(self, roles: list[str]) -> None:
        with self.lock:
            stopping = [actor for role in roles for actor in self.actors.pop(role, [])]
        self._stop(stopping)

    def shutdown(self) -> None:
        """Stop every process: the workers, then the trainer (its last checkpoint records
        in Redis), then the servers, Redis last; each stage's processes side by side."""
        for roles in (["rollout-worker", "scorer"], ["trainer"], ["teacher", "rollout"], ["redis"]):
            self.stop_roles(roles)
        if self.trainer_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.trainer_group)
