"""`rlad up --ray`: the whole stack as Ray actors, placed by the resources of each role.

Joins a Ray cluster (`--ray auto`, `--ray host:6379`, or `cluster.address`) or starts a
local one, starts Redis on this node (a `redis-server` with AOF in the run folder) unless
`cluster.redis` is `external` (REDIS_URL), then hands the deployment to a named detached
controller actor (services/launch/ray_deployment.py) and follows the trainer to its last
step with the same live view, queue accounts and curves as `rlad up`. The servers register
in that Redis and their clients follow the registry. Ray restarts a process that dies, on
another node if its node is gone (services/launch/ray_actors.py).
On a cluster of several nodes the run folder must be on storage that every node mounts at
the same path (checkpoints, the exported weights, logs), as must the models and this code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.runtime import free_port
from services.config.run import RunConfig
from services.launch.cpu_placement import placement_for_this_machine
from services.launch.live_view import LiveView
from services.launch.plots import plot_curves
from services.launch.ray_actors import NAMESPACE, import_ray
from services.launch.ray_deployment import Controller, Plan, check_scalable, controller_name
from services.launch.up import prepare_folder, queue_accounts
from services.queue.connection import clear_run, connect
from trainer.metrics_sink import read_metrics

LOCAL = "local"  # `--ray` without an address: a Ray of our own on this machine


def requested_cpus(run: RunConfig) -> float:
    """The CPUs the deployment asks for at start. A local Ray offers twice that many (or
    the machine's count, if more): Ray's CPUs only place actors here, `cpu_placement`
    shares the cores, and the room lets `rlad scale` add replicas."""
    cluster = run.cluster
    roles = [cluster.rollout_server, cluster.scorer, cluster.rollout_worker, cluster.teacher]
    cpus = sum(role.num_cpus * role.replicas for role in roles)
    return cpus + cluster.trainer.num_cpus * cluster.trainer.world_size


def connect_ray(run: RunConfig, address: str | None) -> Any:
    """Join `address` (or `cluster.address`), else start a local Ray; returns the module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or run.cluster.address or LOCAL
    if address == LOCAL:
        cpus = max(os.cpu_count() or 1, math.ceil(2 * requested_cpus(run)))
        ray.init(namespace=NAMESPACE, num_cpus=cpus, include_dashboard=False)
    else:
        ray.init(address=address, namespace=NAMESPACE)
    return ray


def prepare_redis(run: RunConfig, resume: bool) -> str | None:
    """REDIS_URL when the config says `external`; None: the controller starts one."""
    if run.cluster.redis == "external":
        url = os.environ.get("REDIS_URL")
        if url is None:
            raise RuntimeError("cluster.redis is 'external': set REDIS_URL")
        if not resume:
            clear_run(connect(url), run.name)
        return url
    if not resume:
        shutil.rmtree(run.folder / "redis", ignore_errors=True)
    return None


@dataclass
class RayPipeline:
    """A running deployment: its controller actor and the Redis its processes use."""

    controller: Any
    redis_url: str


@contextmanager
def ray_pipeline(
    run: RunConfig, address: str | None = None, resume: bool = False
) -> Iterator[RayPipeline]:
    """Deploy the stack on Ray; stop every process of it on exit, whatever happened."""
    ray = connect_ray(run, address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = controller_name(run.name)
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise RuntimeError(
            f"run {run.name!r} is already deployed on this Ray cluster: stop it "
            f"(ray.kill(ray.get_actor({name!r}, namespace={NAMESPACE!r}))) or use another name"
        )
    config_path = prepare_folder(run, resume)
    head = ray.get_runtime_context().get_node_id()
    teacher_backend = run.teacher_server.backend if run.teacher_server else "vllm"
    local = (address or run.cluster.address or LOCAL) == LOCAL
    plan = Plan(
        run=run,
        config_path=str(config_path),
        cwd=os.getcwd(),
        redis_url=prepare_redis(run, resume),
        redis_port=free_port(),
        redis_host=ray.util.get_node_ip_address(),
        redis_password=secrets.token_urlsafe(24),
        api_key=os.environ.get("RLAD_API_KEY") or secrets.token_urlsafe(24),
        head_node=head,
        placement=placement_for_this_machine(run.cpu_placement, teacher_backend) if local else {},
        resume=resume,
    )
    controller = (
        ray.remote(Controller)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=64,  # the process actors call back while it starts them
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
        )
        .remote(plan)
    )
    try:
        redis_url = ray.get(controller.deploy.remote())
        yield RayPipeline(controller, redis_url)
    finally:
        try:
            ray.get(controller.shutdown.remote(), timeout=300)
        finally:
            ray.kill(controller, no_restart=True)


def ray_up(run: RunConfig, address: str | None, resume: bool = False, live: bool = True) -> Path:
    """`rlad up --ray`: deploy, follow the trainer to its last step, write the results."""
    folder = run.folder
    with ray_pipeline(run, address, resume) as running:
        ray = import_ray()
        client = connect(running.redis_url)
        with LiveView(run, client, folder / "metrics.jsonl", enabled=live) as view:
            view.status("training on Ray")
            while ray.get(running.controller.trainer_exit_code.remote()) is None:
                view.refresh()
                time.sleep(1.0)
            view.refresh()
        accounts = queue_accounts(client, run.name)
        (folder / "queue_accounts.json").write_text(json.dumps(accounts, indent=2))
    plot_curves(read_metrics(folder / "metrics.jsonl"), folder / "curves.png", title=run.name)
    return folder


def scale(run: RunConfig, role: str, replicas: int, address: str) -> list[str]:
    """`rlad scale`: set `role`'s replica count in the running deployment of `run`; returns
    once the new replicas serve and the removed ones have drained and stopped."""
    check_scalable(run, role)
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        controller = ray.get_actor(controller_name(run.name), namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(
            f"no deployment of run {run.name!r} on the Ray cluster at {address}: "
            "start it with `rlad up --ray`"
        ) from None
    return list(ray.get(controller.scale.remote(role, replicas)))
