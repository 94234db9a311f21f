"""The `cluster:` block of `rlad up --ray`, the error when Ray is not installed, what
`rlad scale` refuses, and how the deployment wires its processes (without starting Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.config.base import ConfigError
from services.config.cluster import SCALABLE_ROLES, ClusterConfig, RoleResources
from services.config.run import RunConfig, load_run_config
from services.launch.ray_actors import RAY_MISSING, import_ray
from services.launch.ray_deployment import (
    Controller,
    Plan,
    deploys_teachers,
    trainer_follows_registry,
)

REDIS_URL = "redis://:secret@10.0.0.1:6379/0"


def test_a_role_asks_ray_for_its_cpus_gpus_and_custom_resources() -> None:
    role = RoleResources(num_cpus=2, num_gpus=1, resources={"node_a": 0.5})
    assert role.ray_bundle() == {"CPU": 2, "GPU": 1, "node_a": 0.5}
    # No zero entries: a bundle that names GPU: 0 would still need a node that declares GPUs.
    assert RoleResources(num_cpus=0).ray_bundle() == {}


def test_the_trainer_spans_nodes_by_ranks_and_is_one_replica() -> None:
    cluster = ClusterConfig.model_validate({"trainer": {"nodes": 2, "ranks_per_node": 4}})
    assert cluster.trainer.world_size == 8
    with pytest.raises(ValueError, match="scale the trainer by its ranks"):
        ClusterConfig.model_validate({"trainer": {"replicas": 2}})
    with pytest.raises(ValueError, match=r"rollout_server\.replicas is 1"):
        ClusterConfig.model_validate({"rollout_server": {"replicas": 2}})


def test_a_misspelt_cluster_key_names_the_nearest(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "student: s\nrollout_server: {}\ntask: {name: kk}\nscorer: {mode: passthrough}\n"
        "algorithm: {name: grpo}\ncluster: {teacher: {num_gpu: 1}}\n"
    )
    with pytest.raises(ConfigError, match=r"cluster\.teacher\.num_gpu.*num_gpus"):
        load_run_config(path)


def test_without_the_ray_extra_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'rlad\[ray\]'"):
        import_ray()
    assert "rlad[ray]" in RAY_MISSING


def test_scale_refuses_a_role_it_cannot_scale() -> None:
    result = CliRunner().invoke(app, ["scale", "trainer", "2", "--name", "x"])
    assert result.exit_code != 0
    assert "cannot scale 'trainer'" in " ".join(result.output.split())


def test_scale_refuses_teachers_in_a_run_that_runs_none_of_its_own() -> None:
    # Its scorer scores with the config's remote pools: a teacher replica would serve no one.
    argv = ["scale", "teacher", "3", "--config", "configs/tiny-pools.yaml"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code != 0
    assert "runs no teacher servers of its own" in " ".join(result.output.split())


def deployment(run: RunConfig) -> Controller:
    plan = Plan(
        run=run,
        config_path="run.yaml",
        cwd=".",
        redis_url=REDIS_URL,
        redis_port=6379,
        redis_host="10.0.0.1",
        redis_password="secret",
        api_key="key",
        head_node="head",
        placement={},
        resume=False,
    )
    return Controller(plan)


def test_servers_register_by_the_environment_and_clients_follow_the_registry() -> None:
    controller = deployment(load_run_config(Path("configs/tiny-cpu.yaml")))
    specs = [controller._role_spec(role, 0)[0] for role in (*SCALABLE_ROLES, "rollout")]
    for spec in specs:  # the URL carries Redis's password: never on a command line
        assert not any("secret" in part for part in spec.argv), spec.argv
        assert not spec.flags_from and not spec.rendezvous_from, spec.name
    by_name = {spec.name: spec for spec in specs}
    for server in ("teacher-0", "rollout-0"):
        assert by_name[server].env["RLAD_REGISTER"] == REDIS_URL
        assert by_name[server].stop_grace_s > 60.0  # the drain's timeout, then the exit
    scorer = " ".join(by_name["scorer-0"].argv)
    assert "--teacher-url registry" in scorer and "--rollout-url registry" in scorer
    assert by_name["scorer-0"].env["REDIS_URL"] == REDIS_URL
    assert "--rollout-url registry" in " ".join(by_name["rollout-worker-0"].argv)


def test_a_run_with_remote_pools_scores_with_them_and_deploys_no_teacher() -> None:
    run = load_run_config(Path("configs/tiny-pools.yaml"))
    assert not deploys_teachers(run)
    scorer = deployment(run)._role_spec("scorer", 0)[0].argv
    flags = [scorer[i + 1] for i, part in enumerate(scorer) if part == "--teacher-url"]
    assert flags == ["small=http://127.0.0.1:8100", "large=http://127.0.0.1:8101"]


def test_the_trainer_follows_the_registry_unless_it_pushes_over_a_device_channel() -> None:
    run = load_run_config(Path("configs/tiny-cpu.yaml"))
    assert trainer_follows_registry(run)  # on the CPU: http
    on_gpu = run.model_copy(update={"cluster": ClusterConfig(trainer={"num_gpus": 1})})
    assert not trainer_follows_registry(on_gpu)  # auto: NCCL or CUDA IPC to a fixed server
    on_gpu.trainer.push_transport = "http"
    assert trainer_follows_registry(on_gpu)
