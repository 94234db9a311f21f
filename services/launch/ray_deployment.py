"""The deployment of one run on Ray: a named, detached controller actor that holds every
process actor of the stack, starts them in order, changes a role's replica count
(`rlad scale`) and stops them all.

Named `rlad:<run>:controller` in the `rlad` namespace, so that `rlad scale` (another
driver) finds it. The process actors ask it for the addresses they are started with (the
rollout server's URL, the teachers', the trainer's rendezvous), and read them again every
few seconds: a server that Ray restarted on another node, or a teacher added or removed,
restarts the processes that call it on the new set (services/launch/ray_actors.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from services.config.cluster import ClusterConfig, RoleResources
from services.config.run import RunConfig
from services.launch.ray_actors import (
    NAMESPACE,
    WATCH_EVERY_S,
    ProcessActor,
    ProcessSpec,
    import_ray,
)
from services.launch.up import RLAD, vllm_cpu_env

# A removed replica is stopped once the processes that called it have read the smaller set.
DRAIN_S = 6 * WATCH_EVERY_S


def controller_name(run: str) -> str:
    return f"rlad:{run}:controller"


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
        uses_teacher = self.run.scorer.mode == "teacher" and not self.run.teacher_urls
        self.scale("rollout", 1)
        if uses_teacher:
            self.scale("teacher", self.cluster.teacher.replicas)
        self.scale("scorer", self.cluster.scorer.replicas)
        self.scale("rollout-worker", self.cluster.rollout_worker.replicas)
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
            spec = self._spec(
                f"trainer-{rank}",
                [*RLAD, *args],
                env=env,
                kind="rendezvous" if rank == 0 else None,
                rendezvous_from=None if rank == 0 else "trainer-0",
                flags_from={"--rollout-url": "rollout"},
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

    def _role_spec(self, role: str, index: int) -> tuple[ProcessSpec, RoleResources]:
        name = f"{role}-{index}"
        placement = self.plan.placement
        if role == "rollout":
            env = {**vllm_cpu_env(self.run.rollout_server), **placement.get("rollout", {})}
            argv = [*RLAD, "serve-rollout", "--config", self.plan.config_path]
            return self._spec(name, argv, env=env, kind="http"), self.cluster.rollout_server
        if role == "teacher":
            assert self.run.teacher_server is not None  # RunConfig: a teacher when needed
            env = {**vllm_cpu_env(self.run.teacher_server), **placement.get("teacher", {})}
            argv = [*RLAD, "serve-teacher", "--config", self.plan.config_path]
            return self._spec(name, argv, env=env, kind="http"), self.cluster.teacher
        if role == "scorer":
            remote = [  # the config's pools, NAME=URL, as `rlad up` passes them
                flag
                for pool in self.run.teacher_urls
                for url in pool.urls
                for flag in ("--teacher-url", f"{pool.name}={url}")
            ]
            inputs = {"--rollout-url": "rollout"}
            if not self.run.teacher_urls:
                inputs["--teacher-url"] = "teacher"
            argv = [*RLAD, "scorer", *self._common(), *remote]
            spec = self._spec(name, argv, env=self._env(), flags_from=inputs)
            return spec, self.cluster.scorer
        if role == "rollout-worker":
            argv = [*RLAD, "rollout-worker", *self._common()]
            inputs = {"--rollout-url": "rollout"}
            return self._spec(
                name, argv, env=self._env(), flags_from=inputs
            ), self.cluster.rollout_worker
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
        """Start or drain replicas of `role` until it has `replicas`; returns their names.
        New replicas join once ready (a server answers /health); removed ones leave the
        set first, and are stopped once their callers have moved to the smaller set."""
        ray = import_ray()
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        with self.lock:
            current = list(self.actors.get(role, []))
        started: list[tuple[str, Any]] = []
        while len(current) + len(started) < replicas:
            index = self.next_index.get(role, 0)
            self.next_index[role] = index + 1
            spec, resources = self._role_spec(role, index)
            started.append((spec.name, self._actor(spec, resources).remote(spec, self.name)))
        ray.get([actor.address_of.remote() for _, actor in started])
        removed = current[replicas:]
        with self.lock:
            self.actors[role] = current[:replicas] + started
        if removed:
            time.sleep(DRAIN_S)
            self._stop(removed)
        return [name for name, _ in self.actors[role]]

    def _stop(self, actors: list[tuple[str, Any]]) -> None:
        ray = import_ray()
        for _, actor in actors:
            # Dead already, or not answering: killed below either way.
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(), timeout=60)
            ray.kill(actor, no_restart=True)

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
        """Stop every process, callers before the servers they call, Redis last."""
        order = ["rollout-worker", "scorer", "trainer", "teacher", "rollout", "redis"]
        self.stop_roles([role for role in order if role in self.actors])
        if self.trainer_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.trainer_group)
