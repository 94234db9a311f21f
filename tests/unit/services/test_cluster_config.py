"""The `cluster:` block of `rlad up --ray`, and the error when Ray is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.config.base import ConfigError
from services.config.cluster import ClusterConfig, RoleResources
from services.config.run import load_run_config
from services.launch.ray_actors import RAY_MISSING, import_ray


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
