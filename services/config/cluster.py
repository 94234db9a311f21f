"""`cluster:`: how `rlad up --ray` places the stack on a Ray cluster.

Each process of the stack runs as a Ray actor that holds the resources of its role, so Ray
puts it on a node that has them and, when the process or its node dies, starts it again
elsewhere (up to `max_restarts` times). Without this block `rlad up --ray` uses the
defaults: one replica per role, one CPU each, no GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.config.base import StrictModel

# The roles of the stack that run as Ray actors, by the name `rlad scale` knows them.
SCALABLE_ROLES = ("teacher", "rollout-worker", "scorer")


class RoleResources(StrictModel):
    """What one replica of a role asks Ray for; Ray places it on a node that has it."""

    replicas: int = Field(
        default=1, ge=0, description="Replicas started with the stack; `rlad scale` changes it."
    )
    num_cpus: float = Field(default=1.0, ge=0.0, description="CPUs one replica holds.")
    num_gpus: float = Field(
        default=0.0, ge=0.0, description="GPUs one replica holds (per rank for the trainer)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources one replica holds, e.g. {accelerator_type:H100: 1} "
        "or a node label resource that pins the role to nodes that declare it.",
    )

    def ray_bundle(self) -> dict[str, float]:
        """The placement-group bundle of one replica (or of one trainer rank)."""
        bundle = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return {key: value for key, value in bundle.items() if value}


class TrainerResources(RoleResources):
    """The trainer's ranks: `nodes` × `ranks_per_node`, one bundle each, in one placement
    group so that they start together (and ZeRO spans the nodes)."""

    nodes: int = Field(default=1, ge=1, description="Nodes the trainer's ranks span.")
    ranks_per_node: int = Field(default=1, ge=1, description="Trainer ranks on each node.")
    strategy: Literal["STRICT_SPREAD", "SPREAD", "PACK"] = Field(
        default="PACK",
        description="Placement-group strategy of the ranks' nodes when `nodes` > 1: "
        "STRICT_SPREAD puts each node's ranks on a different Ray node.",
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @model_validator(mode="after")
    def _one_trainer(self) -> TrainerResources:
        if self.replicas != 1:
            raise ValueError("cluster.trainer.replicas is 1: scale the trainer by its ranks")
        return self


class ClusterConfig(StrictModel):
    address: str | None = Field(
        default=None,
        description="Ray cluster to join: `auto` (the cluster this machine belongs to), "
        "`ray://host:10001` or `host:6379`; none starts a local Ray. `rlad up --ray ADDRESS` "
        "overrides it.",
    )
    redis: Literal["start", "external"] = Field(
        default="start",
        description="`start`: a redis-server with AOF (every write fsynced) on the head node, "
        "its files in the run folder; `external`: the Redis at REDIS_URL.",
    )
    max_restarts: int = Field(
        default=10,
        ge=-1,
        description="How often Ray restarts a replica whose process or node died (-1: always).",
    )
    health_timeout_s: float = Field(
        default=600.0, gt=0.0, description="How long a server may take to answer /health."
    )
    teacher: RoleResources = Field(
        default_factory=RoleResources,
        description="Each teacher server replica (with tensor parallelism: all its GPUs).",
    )
    rollout_server: RoleResources = Field(
        default_factory=RoleResources, description="The rollout server (one replica)."
    )
    rollout_worker: RoleResources = Field(
        default_factory=RoleResources, description="Each rollout worker replica."
    )
    scorer: RoleResources = Field(default_factory=RoleResources, description="Each scorer.")
    trainer: TrainerResources = Field(
        default_factory=TrainerResources, description="The trainer's ranks."
    )

    @model_validator(mode="after")
    def _one_rollout_server(self) -> ClusterConfig:
        # The trainer pushes each version to the rollout server it was started with.
        if self.rollout_server.replicas != 1:
            raise ValueError("cluster.rollout_server.replicas is 1")
        return self
