"""`rlad up --ray` on a real Ray cluster of three simulated nodes (several raylets on this
machine, `ray.cluster_utils.Cluster`): the tiny CPU pipeline (transformers backends, no
vLLM) spreads over the nodes by the resources of each role, its trainer's two ranks on
two nodes, and trains; two rollout workers share the prompt stream while `rlad scale`
adds teachers that serve within seconds and removes them by draining; the pipeline
survives the loss of a node with every group accounted for."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.config.run import RunConfig
from services.launch.ray_actors import NAMESPACE
from services.launch.ray_up import ray_pipeline
from services.launch.up import queue_accounts
from services.queue.keys import ROLLOUTS, RunKeys
from services.queue.registry import ServerRegistry
from tests.integration.test_prompt_cursor import prompt_positions, rollout_groups
from tests.integration.test_registry import scored_requests
from tests.integration.test_scorer import CLI

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow]

STEPS = 10
BATCH_PROMPTS = 2
API_KEY = "ray-test-key"  # the deployment's servers require one: they listen beyond loopback


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
    folder: Path,
    name: str,
    student: Path,
    teacher: Path,
    cluster: dict[str, Any],
    steps: int = STEPS,
    scorer: dict[str, Any] | None = None,
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
                "steps": steps,
                "batch_prompts": BATCH_PROMPTS,
                "checkpoint_every": 3,
                "lr": 1e-4,
            },
            "rollout": {"group_size": 4, "prompts_per_request": 2, "max_tokens": 16},
            "queue": {"max_backlog": 6},
            "scorer": scorer or {},
            "rollout_server": {"backend": "hf"},
            "teacher_server": {"backend": "hf"},
            "cpu_placement": False,
            "cluster": {"max_restarts": 3, "health_timeout_s": 300, **cluster},
        }
    )


def until(condition: Callable[[], bool], timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.5)


def wait_for_trainer(controller: Any, timeout_s: float = 600.0) -> None:
    until(
        lambda: ray.get(controller.trainer_exit_code.remote()) is not None,
        timeout_s,
        "the trainer did not finish",
    )


def nodes_by_role(controller: Any) -> dict[str, str]:
    return {row["name"]: row["node"] for row in ray.get(controller.status.remote())}


def node_with(resource: str) -> str:
    return next(
        node["NodeID"] for node in ray.nodes() if node["Alive"] and resource in node["Resources"]
    )


def trained_by_step_and_rank(run: RunConfig) -> dict[tuple[int, int], list[str]]:
    """The groups each rank trained at each step; a resume rewrites the steps after its
    checkpoint, so the last line of each (step, rank) stands."""
    lines = (run.folder / "trained_groups.jsonl").read_text().splitlines()
    return {(row["step"], row["rank"]): row["groups"] for row in map(json.loads, lines)}


def check_accounts(run: RunConfig, redis_url: str, controller: Any) -> dict[str, int]:
    """Producers stopped, every group produced is trained, stale, dead or still queued, and
    each trained group was trained in one step of the run's history only."""
    ray.get(controller.stop_roles.remote(["rollout-worker", "scorer"]))
    accounts = queue_accounts(redis.Redis.from_url(redis_url), run.name)
    settled = sum(accounts.get(k, 0) for k in ("trained", "stale", "dead"))
    in_streams = accounts["in_rollouts"] + accounts["in_scored"]
    assert accounts["produced"] == settled + in_streams, accounts
    steps = run.trainer.steps
    assert accounts["trained"] == steps * BATCH_PROMPTS, accounts
    final = trained_by_step_and_rank(run)
    assert sorted({step for step, _ in final}) == list(range(1, steps + 1))
    trained = Counter(group for groups in final.values() for group in groups)
    assert max(trained.values()) == 1, "a group trained twice"
    return accounts


def test_the_pipeline_spreads_over_the_nodes_and_its_two_trainer_ranks_train_on_two(
    cluster: Any, tmp_path: Path, tiny_student: Path, tiny_teacher: Path
) -> None:
    placed = {
        "teacher": {"num_cpus": 1, "resources": {"node_b": 0.5}},
        "rollout_server": {"num_cpus": 1, "resources": {"node_c": 0.5}},
        # Gloo on the CPU, as under torchrun, with the rendezvous on rank 0's node.
        "trainer": {"nodes": 2, "ranks_per_node": 1, "strategy": "STRICT_SPREAD", "num_cpus": 0.5},
        "scorer": {"num_cpus": 0.5, "resources": {"node_b": 0.5}},
        "rollout_worker": {"num_cpus": 0.5, "resources": {"node_c": 0.5}},
    }
    run = tiny_run(tmp_path, "spread", tiny_student, tiny_teacher, placed)
    with ray_pipeline(run) as running:
        wait_for_trainer(running.controller)
        nodes = nodes_by_role(running.controller)
        assert nodes["teacher-0"] == node_with("node_b")
        assert nodes["rollout-0"] == node_with("node_c")
        assert nodes["trainer-0"] != nodes["trainer-1"]
        assert len(set(nodes.values())) == 3
        check_accounts(run, running.redis_url, running.controller)
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # Each step trained on both ranks, one group each (B = 2 over a world of 2).
    by_rank = trained_by_step_and_rank(run)
    assert sorted(by_rank) == [(step, rank) for step in range(1, STEPS + 1) for rank in (0, 1)]
    assert {len(groups) for groups in by_rank.values()} == {1}
    logs = ("trainer-0", "trainer-1", "teacher-0", "rollout-0", "scorer-0", "rollout-worker-0")
    for name in (*logs, "redis"):
        assert (run.folder / "logs" / f"{name}.log").exists(), name


def wait_for_steps(run: RunConfig, steps: int, timeout_s: float = 600.0) -> None:
    metrics = run.folder / "metrics.jsonl"
    until(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= steps,
        timeout_s,
        f"fewer than {steps} steps",
    )


class StreamTail:
    """Every entry of a Redis stream, read as it is written: the queue trims acknowledged
    entries, so a read at the end would miss most of them. Start it before the stream
    exists (a blocking XREAD from the start waits for the first entry)."""

    def __init__(self, url: str, key: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = key
        self.entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True, name="tail")
        self.thread.start()

    def _read(self) -> None:
        last: bytes | str = "0-0"
        while not self.done.is_set():
            for _, entries in self.client.xread({self.key: last}, block=200) or []:
                self.entries += entries
                last = entries[-1][0]

    def stop(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        self.done.set()
        self.thread.join()
        return self.entries


def registered(registry: ServerRegistry) -> list[str]:
    return sorted(record.url for record in registry.servers("teacher"))


def rlad_scale(address: str, run: RunConfig, replicas: int) -> None:
    """`rlad scale teacher N` in a process of its own, as an operator types it."""
    argv = [*CLI, "scale", "teacher", str(replicas), "--ray", address]
    argv += ["--config", str(run.folder / "config.yaml"), "--name", run.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"teacher: {replicas} replicas" in done.stdout


def test_two_rollout_workers_never_repeat_a_prompt_while_teachers_scale_up_and_drain(
    cluster: Any,
    tmp_path: Path,
    tiny_student: Path,
    tiny_teacher: Path,
    redis_url: str,
    fresh_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run on the test's Redis (`external`), so that its rollouts can be read from the
    # first one on.
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RLAD_API_KEY", API_KEY)
    placed = {
        "redis": "external",
        "teacher": {"num_cpus": 0.5},
        "rollout_server": {"num_cpus": 1},
        "scorer": {"num_cpus": 0.5},
        "rollout_worker": {"replicas": 2, "num_cpus": 0.5},
        "trainer": {"num_cpus": 1},
    }
    # One group per teacher call: many calls, spread over the replicas by their load.
    run = tiny_run(tmp_path, "scaled", tiny_student, tiny_teacher, placed, 20, {"batch_groups": 1})
    registry = ServerRegistry(fresh_redis, run.name)
    tail = StreamTail(redis_url, RunKeys(run.name).stream(ROLLOUTS))
    try:
        with ray_pipeline(run) as running:
            wait_for_steps(run, 1)
            # The trainer steps faster than a teacher starts: hold the workers while the
            # teachers start, so that the run cannot end first (it trains what is queued,
            # at most queue.max_backlog groups and the workers' last requests).
            controller = running.controller
            assert ray.get(controller.scale.remote("rollout-worker", 0)) == []
            rlad_scale(cluster.address, run, 3)
            teachers = ray.get(controller.addresses.remote("teacher"))
            until(lambda: registered(registry) == sorted(teachers), 10, "not registered")
            assert len(ray.get(controller.scale.remote("rollout-worker", 2))) == 2
            until(  # the running scorer found each new teacher and sent it work
                lambda: all(scored_requests(url, API_KEY) > 0 for url in teachers[1:]),
                60,
                "a new teacher served nothing",
            )
            rlad_scale(cluster.address, run, 1)
            # The removed teachers drained and withdrew before `rlad scale` returned.
            assert registered(registry) == teachers[:1]
            wait_for_trainer(running.controller)
            accounts = check_accounts(run, running.redis_url, running.controller)
            assert accounts.get("dead", 0) == 0, accounts
    finally:
        entries = tail.stop()
    positions = prompt_positions(rollout_groups(entries))
    assert len(positions) == accounts["produced"], "the tail missed a group"
    assert len(set(positions)) == len(positions), "a prompt generated twice"


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
