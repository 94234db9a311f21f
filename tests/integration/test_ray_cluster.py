"""`rlad up --ray` on a real Ray cluster of three simulated nodes (several raylets on this
machine, `ray.cluster_utils.Cluster`): the tiny CPU pipeline (transformers backends, no
vLLM) spreads over the nodes by the resources of each role, trains, and survives the loss
of a node with every group accounted for."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.config.run import RunConfig
from services.launch.ray_actors import NAMESPACE
from services.launch.ray_up import ray_pipeline
from services.launch.up import queue_accounts

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow]

STEPS = 10
BATCH_PROMPTS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three nodes; each declares a resource of its own, which a role can ask for to be
    placed there (as a GPU type would place it on a real cluster)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=2, resources={"node_b": 1})
    nodes.add_node(num_cpus=2, resources={"node_c": 1})
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace=NAMESPACE)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def tiny_run(
    folder: Path, name: str, student: Path, teacher: Path, cluster: dict[str, Any]
) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": name,
            "run_dir": str(folder),
            "student": str(student),
            "teacher": str(teacher),
            "task": {"name": "kk", "people": [2], "rendering": "compact"},
            # An untrained student earns equal rewards; KDRL's distillation term still moves
            # the weights every step.
            "algorithm": {"name": "kdrl", "kd_beta_start": 0.5, "kd_beta_end": 0.5},
            "trainer": {
                "steps": STEPS,
                "batch_prompts": BATCH_PROMPTS,
                "checkpoint_every": 3,
                "lr": 1e-4,
            },
            "rollout": {"group_size": 4, "prompts_per_request": 2, "max_tokens": 16},
            "queue": {"max_backlog": 6},
            "rollout_server": {"backend": "hf"},
            "teacher_server": {"backend": "hf"},
            "cpu_placement": False,
            "cluster": {"max_restarts": 3, "health_timeout_s": 300, **cluster},
        }
    )


def wait_for_trainer(controller: Any, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.get(controller.trainer_exit_code.remote()) is None:
        assert time.monotonic() < deadline, "the trainer did not finish"
        time.sleep(1.0)


def nodes_by_role(controller: Any) -> dict[str, str]:
    return {row["name"]: row["node"] for row in ray.get(controller.status.remote())}


def node_with(resource: str) -> str:
    return next(
        node["NodeID"] for node in ray.nodes() if node["Alive"] and resource in node["Resources"]
    )


def check_accounts(run: RunConfig, redis_url: str, controller: Any) -> dict[str, int]:
    """Producers stopped, every group produced is trained, stale, dead or still queued, and
    each trained group was trained in one step of the run's history only."""
    ray.get(controller.stop_roles.remote(["rollout-worker", "scorer"]))
    accounts = queue_accounts(redis.Redis.from_url(redis_url), run.name)
    settled = sum(accounts.get(k, 0) for k in ("trained", "stale", "dead"))
    in_streams = accounts["in_rollouts"] + accounts["in_scored"]
    assert accounts["produced"] == settled + in_streams, accounts
    assert accounts["trained"] == STEPS * BATCH_PROMPTS, accounts
    # A resume rewrites the steps after its checkpoint: the last line of each step stands.
    lines = (run.folder / "trained_groups.jsonl").read_text().splitlines()
    final = {row["step"]: row["groups"] for row in map(json.loads, lines)}
    assert sorted(final) == list(range(1, STEPS + 1))
    trained = Counter(group for groups in final.values() for group in groups)
    assert max(trained.values()) == 1, "a group trained twice"
    return accounts


def test_the_pipeline_spreads_over_the_nodes_and_trains(
    cluster: Any, tmp_path: Path, tiny_student: Path, tiny_teacher: Path
) -> None:
    placed = {
        "teacher": {"num_cpus": 1, "resources": {"node_b": 0.5}},
        "rollout_server": {"num_cpus": 1, "resources": {"node_c": 0.5}},
        "trainer": {"num_cpus": 1, "resources": {"node_a": 0.5}},
        "scorer": {"num_cpus": 0.5, "resources": {"node_b": 0.5}},
        "rollout_worker": {"num_cpus": 0.5, "resources": {"node_c": 0.5}},
    }
    run = tiny_run(tmp_path, "spread", tiny_student, tiny_teacher, placed)
    with ray_pipeline(run) as running:
        wait_for_trainer(running.controller)
        nodes = nodes_by_role(running.controller)
        assert nodes["teacher-0"] == node_with("node_b")
        assert nodes["rollout-0"] == node_with("node_c")
        assert nodes["trainer-0"] == node_with("node_a")
        assert len(set(nodes.values())) == 3
        check_accounts(run, running.redis_url, running.controller)
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for name in ("trainer-0", "teacher-0", "rollout-0", "scorer-0", "rollout-worker-0", "redis"):
        assert (run.folder / "logs" / f"{name}.log").exists(), name


def wait_for_steps(run: RunConfig, steps: int, timeout_s: float = 600.0) -> None:
    metrics = run.folder / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps:
        assert time.monotonic() < deadline, f"fewer than {steps} steps"
        time.sleep(1.0)


def test_a_lost_node_comes_back_elsewhere_and_no_group_is_lost_or_trained_twice(
    cluster: Any, tmp_path: Path, tiny_student: Path, tiny_teacher: Path
) -> None:
    # The trainer and the scorer may run only where `movable` is: at first on one node.
    doomed = cluster.add_node(num_cpus=2, resources={"movable": 2})
    cluster.wait_for_nodes()
    placed = {
        "teacher": {"num_cpus": 1, "resources": {"node_b": 0.5}},
        "rollout_server": {"num_cpus": 1, "resources": {"node_c": 0.5}},
        "rollout_worker": {"num_cpus": 0.5, "resources": {"node_c": 0.5}},
        "trainer": {"num_cpus": 1, "resources": {"movable": 1}},
        "scorer": {"num_cpus": 0.5, "resources": {"movable": 1}},
    }
    run = tiny_run(tmp_path, "lost-node", tiny_student, tiny_teacher, placed)
    with ray_pipeline(run) as running:
        doomed_id = node_with("movable")
        before = nodes_by_role(running.controller)
        assert before["trainer-0"] == before["scorer-0"] == doomed_id
        wait_for_steps(run, 4)  # past the first checkpoint (step 3)
        cluster.add_node(num_cpus=2, resources={"movable": 2})
        cluster.remove_node(doomed)
        wait_for_trainer(running.controller)
        after = {row["name"]: row for row in ray.get(running.controller.status.remote())}
        for name in ("trainer-0", "scorer-0"):
            assert after[name]["node"] not in (doomed_id, None), name
            assert after[name]["restarted"], name
        assert not after["teacher-0"]["restarted"]
        check_accounts(run, running.redis_url, running.controller)
    assert "resumed at step" in (run.folder / "logs" / "trainer-0.log").read_text()
