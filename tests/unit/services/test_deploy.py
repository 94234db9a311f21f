"""The Kubernetes manifests and the Slurm script of deploy/, checked without a cluster.

Built-in kinds (Deployment, Service, PersistentVolumeClaim, ConfigMap) are validated by
`kubernetes-validate` against the Kubernetes API's own schemas, strictly (an unknown field
is refused). kubernetes-validate has no schema for KubeRay's custom resources, so RayCluster
and RayJob are checked in two parts: the KubeRay fields by the pydantic models below, which
hold the required fields and types of the `ray.io/v1` CRDs for the fields these manifests
use (an unknown one is refused; add it here from the CRD when a manifest needs it), and every
pod template inside them by kubernetes-validate, as the core `PodTemplate` it is. Then the
pieces must fit: the names a manifest refers to exist, the experiment parses as a RunConfig,
and the RayJob's command is the CLI's. Mutated manifests are refused, so the checks can fail.
The Slurm script passes `bash -n` and shellcheck. None of it has run on a real cluster."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.cli.main import app
from services.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[3]
KUBERAY = ROOT / "deploy/kuberay"
SLURM = ROOT / "deploy/slurm/rlad.sbatch"
KUBERNETES = "1.33.0"  # the oldest Kubernetes the manifests are checked against
CUSTOM = {"RayCluster", "RayJob"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HeadGroupSpec(Strict):
    rayStartParams: dict[str, str] = {}
    template: dict[str, Any]


class WorkerGroupSpec(Strict):
    groupName: str = Field(min_length=1)
    replicas: int = Field(default=0, ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    rayStartParams: dict[str, str] = {}
    template: dict[str, Any]


class RayClusterSpec(Strict):
    rayVersion: str
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = []


class RayJobSpec(Strict):
    entrypoint: str = Field(min_length=1)
    clusterSelector: dict[str, str]
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
    backoffLimit: int = Field(ge=0)


SPECS: dict[str, type[Strict]] = {"RayCluster": RayClusterSpec, "RayJob": RayJobSpec}


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


DOCUMENTS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in DOCUMENTS if doc["kind"] == kind]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        return [spec["headGroupSpec"]["template"]] + [
            group["template"] for group in spec.get("workerGroupSpecs", [])
        ]
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    return []


def validate(doc: dict[str, Any]) -> None:
    """Raises when the manifest is not a valid object of its kind."""
    if doc["kind"] not in CUSTOM:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    SPECS[doc["kind"]].model_validate(doc["spec"])
    for template in pod_templates(doc):
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            },
            KUBERNETES,
            strict=True,
        )


def test_the_manifests_are_there() -> None:
    kinds = sorted(doc["kind"] for doc in DOCUMENTS)
    claims = ["PersistentVolumeClaim"] * 2  # Redis's, and the data every Ray pod shares
    assert kinds == sorted(["ConfigMap", "Deployment", *claims, "RayCluster", "RayJob", "Service"])


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)


def set_at(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with the value at a dotted path (list indexes as numbers) replaced,
    or removed when `value` is ...; a key that is not there is added."""
    broken = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return broken


BROKEN = [
    ("Deployment", "spec.replicas", "one"),  # a string for an integer
    ("Deployment", "spec.template.spec.containers.0.imagePullPolicyy", "Always"),  # a typo
    ("Service", "spec.ports.0.port", "6379"),  # a string for an integer
    ("PersistentVolumeClaim", "spec.accessModes", "ReadWriteOnce"),  # not a list
    ("RayCluster", "spec.workerGroupSpecs.0.groupName", ...),  # required by the CRD
    ("RayCluster", "spec.headGroupSpec.rayStartParams.num-gpus", 0),  # params are strings
    ("RayCluster", "spec.workerGroupSpec", []),  # a typo of workerGroupSpecs
    ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.resources.limits", "8"),
    ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.env.0.valueFrom", 1),
    ("RayJob", "spec.entrypoint", ...),
    ("RayJob", "spec.submissionMode", "K8sJob"),
]


@pytest.mark.parametrize(("kind", "path", "value"), BROKEN, ids=[f"{k}:{p}" for k, p, _ in BROKEN])
def test_a_broken_manifest_is_refused(kind: str, path: str, value: Any) -> None:
    doc = by_kind(kind)[0]
    validate(doc)  # as shipped
    with pytest.raises(Exception) as refused:
        validate(set_at(doc, path, value))
    assert not isinstance(refused.value, (KeyError, IndexError)), "the mutation missed its path"


def container_env(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = template["spec"]["containers"]
    return {item["name"]: item for item in container.get("env", [])}


def test_redis_keeps_an_append_only_file_and_demands_the_secrets_password() -> None:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert '--requirepass "$p"' in container["command"][2]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert mounts["data"] == "/data" and "--dir" in container["args"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "rlad-redis-data"
    assert volumes["password"]["secret"]["secretName"] == "rlad-redis"
    assert f"{mounts['password']}/password" in container["command"][2]
    (service,) = by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == 6379


def test_every_ray_pod_reaches_redis_with_the_password_file_and_mounts_the_config() -> None:
    (cluster,) = by_kind("RayCluster")
    (service,) = by_kind("Service")
    claims = {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}
    (config_map,) = by_kind("ConfigMap")
    for template in pod_templates(cluster):
        env = container_env(template)
        assert env["REDIS_URL"]["value"] == f"redis://{service['metadata']['name']}:6379/0"
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        password = Path(env["REDIS_PASSWORD_FILE"]["value"])
        assert volumes[mounts[str(password.parent)]]["secret"]["secretName"] == "rlad-redis"
        assert volumes[mounts["/configs"]]["configMap"]["name"] == config_map["metadata"]["name"]
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] in claims
        assert env["RLAD_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "rlad-api-key"
        assert template["spec"]["securityContext"]["runAsUser"] == 10001  # the images' user
        # The project's GPU image, at the version compose builds.
        version = re.search(r"^RLAD_VERSION=(\S+)$", (ROOT / ".env.example").read_text(), re.M)
        assert version and container["image"] == f"rlad-gpu:{version.group(1)}"
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(
        "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        for g in groups
    )


def secret_names(node: Any) -> set[str]:
    """The Secrets a manifest uses: volumes (`secretName`) and variables (`secretKeyRef`)."""
    if isinstance(node, list):
        return set().union(*(secret_names(item) for item in node))
    if not isinstance(node, dict):
        return set()
    found = {node["secretName"]} if "secretName" in node else set()
    if "secretKeyRef" in node:
        found.add(node["secretKeyRef"]["name"])
    return found.union(*(secret_names(value) for value in node.values()))


def test_the_secrets_the_manifests_use_are_made_as_the_readme_says() -> None:
    readme = (ROOT / "README.md").read_text()
    used = secret_names(DOCUMENTS)
    assert used == {"rlad-redis", "rlad-api-key"}
    for name in used:  # from the files scripts/secrets.sh makes
        assert re.search(rf"kubectl create secret generic {name} --from-file=\S+=secrets/", readme)


def test_the_job_runs_rlad_up_on_ray_with_the_mounted_experiment() -> None:
    (job,) = by_kind("RayJob")
    (cluster,) = by_kind("RayCluster")
    (config_map,) = by_kind("ConfigMap")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["rlad", "up"] and argv[argv.index("--ray") + 1] == "auto"
    up_options = {
        opt
        for param in typer.main.get_command(app).commands["up"].params
        for opt in param.opts  # type: ignore[attr-defined]
    }
    flags = {arg for arg in argv if arg.startswith("--")}
    assert flags - {"--ray"} <= up_options, flags - up_options
    config = Path(argv[argv.index("--config") + 1])
    assert config.parent == Path("/configs") and config.name in config_map["data"]
    run = RunConfig.model_validate(yaml.safe_load(config_map["data"][config.name]))
    assert str(run.run_dir) == "/data/runs"  # on the shared claim every pod mounts


def test_the_slurm_script_parses_and_passes_shellcheck() -> None:
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(SLURM)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


STUBS = {
    # Slurm: three nodes; each srun step is recorded (Ray's nodes would block there).
    "scontrol": "echo node-a; echo node-b; echo node-c",
    "srun": 'echo "srun $*" >> "$LOG"',
    "ray": 'echo "ray $*" >> "$LOG"',
    "hostname": "echo 127.0.0.1",
    # The driver: what it was given, and whether the Redis it was pointed at lets it in.
    "rlad": """echo "rlad $*" >> "$LOG"
echo "REDIS_URL=$REDIS_URL" >> "$LOG"
for _ in $(seq 100); do
  answer=$(REDISCLI_AUTH=$(cat "$REDIS_PASSWORD_FILE") redis-cli -u "$REDIS_URL" ping 2>&1) || true
  [ "$answer" = PONG ] && break
  sleep 0.1
done
echo "ping $answer" >> "$LOG"
echo "without password $(redis-cli -u "$REDIS_URL" ping 2>&1)" >> "$LOG"
""",
}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_slurm_script_starts_ray_on_every_node_redis_and_the_driver(tmp_path: Path) -> None:
    """The script run outside Slurm with stand-ins for scontrol, srun, ray and rlad that
    record what they are asked; Redis is a real redis-server."""
    from services.common.runtime import free_port

    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/activate").write_text("")
    log, port = tmp_path / "calls.log", free_port()
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "LOG": str(log),
        "SLURM_JOB_NODELIST": "node-[a-c]",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_GPUS_ON_NODE": "2",
        "RLAD_VENV": str(tmp_path / "venv"),
        "REDIS_PORT": str(port),
    }
    refused = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "set RLAD_CONFIG" in refused.stderr
    env["RLAD_CONFIG"] = "configs/my-run.yaml"
    result = subprocess.run(
        ["bash", str(SLURM)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    head = "ray start --head --node-ip-address=127.0.0.1 --port=6380 --num-cpus=4 --num-gpus=2"
    assert f"srun --nodes=1 --ntasks=1 -w node-a {head} --block" in calls
    for node in ("node-b", "node-c"):
        worker = "ray start --address=127.0.0.1:6380 --num-cpus=4 --num-gpus=2 --block"
        assert f"srun --nodes=1 --ntasks=1 -w {node} {worker}" in calls
    assert "rlad up --ray auto --config configs/my-run.yaml --no-live" in calls
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0" in calls
    assert "ping PONG" in calls
    assert any(c.startswith("without password NOAUTH") for c in calls), calls
    password = tmp_path / "runs/slurm-42/redis/password"
    assert password.stat().st_mode & 0o077 == 0 and len(password.read_text()) == 64
    assert (tmp_path / "runs/slurm-42/redis/appendonlydir").is_dir()  # its AOF
    # The Redis it started stops with it.
    from services.queue.access import spoken_protocol

    deadline = time.monotonic() + 10
    while spoken_protocol("127.0.0.1", port) != "unreachable":
        assert time.monotonic() < deadline, "the job's Redis outlived the job"
        time.sleep(0.1)
