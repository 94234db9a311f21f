"""docker-compose.yml, parsed and checked: healthchecks, pinned images, health-gated
dependencies, volumes and GPU reservations where they belong, every variable documented in
.env.example with the same default, keys only as secret files (scripts/secrets.sh makes them),
Redis with the password of its secret and every process that uses Redis given it (the Redis
service's start line and healthcheck run against a real redis-server), every `rlad` flag a compose
command passes accepted by the real CLI, the experiments the entrypoint renders valid, and
only keys that both Compose v2 and docker-compose 1.29 accept (validated by each of them
that is installed). scripts/compose_smoke.sh runs the stack itself."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from services.cli.main import app
from services.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docker"))
from render_config import placeholders, render, render_files  # noqa: E402

COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
GPU_TEMPLATE = (ROOT / "docker/config/gpu.yaml").read_text()
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
GPU_SERVICES = {"teacher", "rollout", "trainer"}
ALWAYS_ON = {"redis", "monitor", "prometheus", "grafana"}
ONE_SHOT = {name for name, svc in SERVICES.items() if svc.get("restart") == "no"}


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def dependencies(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = svc.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on must be a mapping with a condition"
    return deps


def test_every_long_running_service_has_a_healthcheck() -> None:
    assert {"bootstrap"} == ONE_SHOT
    for name, svc in SERVICES.items():
        if name in ONE_SHOT:
            continue
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert check.get("interval") and check.get("retries"), name


def test_images_are_pinned_or_built_from_the_repository() -> None:
    for name, svc in SERVICES.items():
        image = svc.get("image", "")
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), (name, image)
        build = svc.get("build")
        if build is None:
            continue
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        if "target" in build:
            assert re.search(rf"^FROM .+ AS {build['target']}$", dockerfile.read_text(), re.M)


def test_dependencies_wait_for_health() -> None:
    for name, svc in SERVICES.items():
        for dep, spec in dependencies(svc).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if dep in ONE_SHOT:
                assert spec["condition"] == "service_completed_successfully", (name, dep)
                continue
            assert spec["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in SERVICES[dep], dep
            # Only the local teacher may be absent: remote teachers replace it.
            assert spec.get("required", True) or dep == "teacher", (name, dep)
    # The local teacher is left out when TEACHER_URLS points elsewhere: the scorer waits for
    # a teacher itself (an optional dependency would need Compose v2's `required: false`).
    assert "teacher" not in dependencies(SERVICES["scorer"])
    for worker in ("scorer", "rollout-worker", "trainer"):
        assert {"redis", "rollout"} <= set(dependencies(SERVICES[worker])), worker
        assert {"redis", "rollout-cpu"} <= set(dependencies(SERVICES[f"{worker}-cpu"])), worker


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_reservations_only_where_gpus_run() -> None:
    reserving = {name for name, svc in SERVICES.items() if gpu_devices(svc)}
    assert reserving == GPU_SERVICES
    for name in GPU_SERVICES:
        (device,) = gpu_devices(SERVICES[name])
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # `count` cannot come from a variable (compose accepts only 'all' there); ids can.
        (ids,) = device["device_ids"]
        assert VARIABLE.fullmatch(ids), name
        assert SERVICES[name]["image"].startswith("rlad-gpu:")


def test_volumes_are_where_they_belong() -> None:
    declared = set(COMPOSE["volumes"])
    redis_service = SERVICES["redis"]
    assert "redis-data:/data" in redis_service["volumes"]
    assert redis_service["command"][redis_service["command"].index("--appendonly") + 1] == "yes"
    needs_data = GPU_SERVICES | {n for n, s in SERVICES.items() if "cpu" in s.get("profiles", [])}
    needs_data |= {"scorer", "rollout-worker"}  # tokenizers and run files on the shared volume
    for name, svc in SERVICES.items():
        mounts = svc.get("volumes", [])
        assert ("rlad-data:/data" in mounts) == (name in needs_data), name
        for mount in mounts:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in declared, (name, source)
    provisioning = yaml.safe_load(
        (ROOT / "docker/grafana/provisioning/dashboards/rlad.yml").read_text()
    )
    dashboards_path = provisioning["providers"][0]["options"]["path"]
    assert f"./docker/grafana/dashboards:{dashboards_path}:ro" in SERVICES["grafana"]["volumes"]
    prometheus = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        assert (ROOT / "docker/prometheus" / Path(rule_file).name).is_file()


def test_every_variable_is_documented_with_the_same_default() -> None:
    documented = env_example()
    used = {m.group(1): m.group(2) for m in VARIABLE.finditer(COMPOSE_TEXT)}
    settings = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}
    for name in set(used) | placeholders(GPU_TEMPLATE) | settings:
        assert name in documented, f"{name} is used but not in .env.example"
    for name, default in used.items():
        if default is not None:
            assert documented[name] == default, f"{name}: compose {default!r}, .env.example"
    for match in VARIABLE.finditer(GPU_TEMPLATE):
        if match.group(2) is not None:
            assert documented[match.group(1)] == match.group(2), match.group(1)


def test_keys_are_secrets_never_environment() -> None:
    for name, secret in COMPOSE["secrets"].items():
        # Files (docker-compose 1.29 has no `environment` source), never .env variables.
        assert secret == {"file": f"${{RLAD_SECRETS:-./secrets}}/{name}"}, name
        assert not re.search(rf"^{name.upper()}=", (ROOT / ".env.example").read_text(), re.M)
    for name, svc in SERVICES.items():
        for key, value in svc.get("environment", {}).items():
            if re.search(r"API_KEY|PASSWORD|SECRET|HF_TOKEN", key):
                # Only a pointer to a mounted secret file (Grafana's `__FILE`, REDIS_PASSWORD_FILE).
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), (name, key)
                assert value.removeprefix("/run/secrets/") in svc["secrets"], (name, key)
        if name not in ALWAYS_ON:  # every pipeline process talks to an authenticated server
            assert (name in ONE_SHOT) != ("rlad_api_key" in svc.get("secrets", [])), name
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and "secrets" in ignored


REDIS_SECRET = "/run/secrets/redis_password"


def test_redis_demands_the_password_of_its_secret_from_every_client() -> None:
    redis_service = SERVICES["redis"]
    assert redis_service["secrets"] == ["redis_password"]
    assert REDIS_SECRET in redis_service["entrypoint"][2]
    assert '--requirepass "$$p"' in redis_service["entrypoint"][2]
    assert REDIS_SECRET in redis_service["healthcheck"]["test"][1]
    clients = {n for n, s in SERVICES.items() if "REDIS_URL" in s.get("environment", {})}
    assert {"trainer", "scorer", "rollout-worker", "monitor"} <= clients
    assert {"trainer-cpu", "scorer-cpu", "rollout-worker-cpu"} <= clients
    for name, svc in SERVICES.items():
        environment = svc.get("environment", {})
        if name not in clients:
            assert "REDIS_PASSWORD_FILE" not in environment, name
            continue
        # The URL names no password: each process reads the mounted secret.
        assert environment["REDIS_URL"] == "redis://redis:6379/0", name
        assert environment["REDIS_PASSWORD_FILE"] == REDIS_SECRET, name
        assert "redis_password" in svc["secrets"], name


def container_shell(line: str, secret: Path) -> str:
    """A compose shell line as the container's shell runs it (`$$` is compose's `$`), with
    the secret at `secret` instead of /run/secrets."""
    return line.replace("$$", "$").replace(REDIS_SECRET, str(secret))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_redis_service_starts_with_its_secret_and_its_healthcheck_uses_it(
    tmp_path: Path,
) -> None:
    """The Redis service's entrypoint, command and healthcheck run here as compose runs
    them, with a real redis-server (the engine itself: scripts/compose_smoke.sh)."""
    import redis

    from services.common.runtime import free_port

    service = SERVICES["redis"]
    shell, flag, script, name = service["entrypoint"]
    secret = tmp_path / "redis_password"
    port = free_port()
    argv = [shell, flag, container_shell(script, secret), name, *service["command"]]
    argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    secret.write_text("")
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 64 and "run scripts/secrets.sh" in refused.stderr
    secret.write_text("from-the-secret")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="from-the-secret")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.config_get("appendonly") == {"appendonly": "yes"}
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        # `ps` shows redis-server's title, not the password it was given.
        assert b"from-the-secret" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        check = container_shell(service["healthcheck"]["test"][1], secret)
        check = check.replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", check]).returncode == 0
        secret.write_text("not-the-password")
        assert subprocess.run(["sh", "-c", check], capture_output=True).returncode != 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_secrets_script_makes_every_compose_secret_once(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    script = str(ROOT / "scripts/secrets.sh")
    made = subprocess.run([script, str(folder)], capture_output=True, text=True, check=True)
    assert made.stdout.count(": made") == len(COMPOSE["secrets"])
    keys = {name: (folder / name).read_text() for name in COMPOSE["secrets"]}
    assert all(re.fullmatch(r"[0-9a-f]{32,64}", key) for key in keys.values()), keys
    again = subprocess.run([script, str(folder)], capture_output=True, text=True, check=True)
    assert again.stdout.count(": kept") == len(COMPOSE["secrets"])
    assert keys == {name: (folder / name).read_text() for name in COMPOSE["secrets"]}
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_profiles_select_gpu_cpu_and_the_local_teacher() -> None:
    for name, svc in SERVICES.items():
        profiles = svc.get("profiles", [])
        assert (name in ALWAYS_ON) == (not profiles), name
        assert len(profiles) <= 1, name
    assert SERVICES["teacher"]["profiles"] == ["teacher"]
    assert (
        SERVICES["scorer"]["environment"]["TEACHER_URLS"] == "${TEACHER_URLS:-http://teacher:8000}"
    )
    # The CPU servers answer to the same names, so scorer URLs and Prometheus jobs are shared.
    assert SERVICES["teacher-cpu"]["networks"]["default"]["aliases"] == ["teacher"]
    assert SERVICES["rollout-cpu"]["networks"]["default"]["aliases"] == ["rollout"]
    # Scaling: no fixed container name, and one host port per replica from a range.
    assert not any("container_name" in svc for svc in SERVICES.values())
    (ports,) = SERVICES["teacher"]["ports"]
    assert ports.endswith(":${TEACHER_HOST_PORTS:-8000-8007}:8000")
    assert SERVICES["teacher-cpu"]["ports"] == SERVICES["teacher"]["ports"]
    # Remote teachers for the CPU demo too, as for the GPU profile.
    teacher_urls = SERVICES["scorer-cpu"]["environment"]["TEACHER_URLS"]
    assert teacher_urls == SERVICES["scorer"]["environment"]["TEACHER_URLS"]


def cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in param.opts}
        for name, command in group.commands.items()  # type: ignore[attr-defined]
    }


def rlad_argv(command: list[str]) -> list[str] | None:
    if command[:2] == ["sh", "-c"]:  # `... && rlad ...`: the last command of the line
        command = shlex.split(re.split(r"&&|\|\||;", command[2])[-1])
    if command[0] == "rlad":
        return command[1:]
    if command[0] == "torchrun":
        return command[command.index("services.cli.main") + 1 :]
    return None


def test_compose_commands_use_real_cli_options() -> None:
    options = cli_options()
    for name, svc in SERVICES.items():
        argv = rlad_argv(svc.get("command", ["-"]))
        if argv is None:
            continue
        subcommand, *args = argv
        assert subcommand in options, (name, subcommand)
        for arg in args:
            if arg.startswith("--"):
                assert arg in options[subcommand], f"{name}: rlad {subcommand} has no {arg}"
        config = next((args[i + 1] for i, a in enumerate(args) if a == "--config"), None)
        if config == "/tmp/rlad-config.yaml":  # rendered by docker/entrypoint.sh from:
            config = svc["environment"]["RLAD_CONFIG_TEMPLATE"]
        if config:
            assert (ROOT / config.removeprefix("/opt/rlad/")).is_file(), (name, config)


def test_gpu_template_renders_to_a_valid_run_config() -> None:
    defaults = RunConfig.model_validate(yaml.safe_load(render(GPU_TEMPLATE, env_example())))
    assert defaults.student == "Qwen/Qwen3-1.7B" and defaults.algorithm.name == "trrd"
    assert str(defaults.run_dir) == "/data/runs"
    chosen = render(GPU_TEMPLATE, {"STUDENT_MODEL": "org/small", "TRAIN_STEPS": "7"})
    config = RunConfig.model_validate(yaml.safe_load(chosen))
    assert (config.student, config.trainer.steps) == ("org/small", 7)
    with pytest.raises(ValueError, match="NEEDED"):
        render("student: ${NEEDED}\nteacher: ${ALSO:-x}\n", {})


def test_cpu_profile_renders_the_demo_and_the_smoke_run() -> None:
    environment = SERVICES["trainer-cpu"]["environment"]
    template = ROOT / environment["RLAD_CONFIG_TEMPLATE"].removeprefix("/opt/rlad/")
    assert environment["RLAD_CONFIG_OVERLAY"] == "${CPU_CONFIG_OVERLAY:-}"
    demo = RunConfig.model_validate(yaml.safe_load(render_files(str(template), [], {})))
    assert demo == RunConfig.model_validate(yaml.safe_load(template.read_text()))
    smoke_overlay = str(ROOT / "docker/config/smoke.yaml")
    smoke = RunConfig.model_validate(
        yaml.safe_load(render_files(str(template), [smoke_overlay], {}))
    )
    assert (smoke.name, smoke.trainer.steps) == ("compose-smoke", 10)
    # The demo's models, task, algorithm and sampling: only the run's length and name differ.
    for block in ("student", "teacher", "task", "algorithm", "rollout", "queue"):
        assert getattr(smoke, block) == getattr(demo, block), block


# Keys of the compose specification that docker-compose 1.29's schema refuses, by where
# they sit; the file must run with both implementations.
NEWER_THAN_V1 = {
    "top level": {"name", "include"},
    "service": {"develop", "post_start", "pre_stop", "provider", "models", "gpus"},
    "healthcheck": {"start_interval"},
    "depends_on": {"required", "restart"},
    "secret": {"environment", "content"},
}


def test_no_key_is_newer_than_docker_compose_1_29() -> None:
    found = set(COMPOSE) & NEWER_THAN_V1["top level"]
    for svc in SERVICES.values():
        found |= set(svc) & NEWER_THAN_V1["service"]
        found |= set(svc.get("healthcheck", {})) & NEWER_THAN_V1["healthcheck"]
        for spec in dependencies(svc).values():
            found |= set(spec) & NEWER_THAN_V1["depends_on"]
    for secret in COMPOSE["secrets"].values():
        found |= set(secret) & NEWER_THAN_V1["secret"]
    assert not found, f"keys docker-compose 1.29 refuses: {sorted(found)}"


def compose_tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        tools.append([docker, "compose"])
    return tools


@pytest.mark.parametrize("profiles", ["gpu,teacher", "cpu"])
def test_installed_composes_validate_the_file(profiles: str) -> None:
    tools = compose_tools()
    if not tools:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    for tool in tools:
        result = subprocess.run(
            [
                *tool,
                "--project-directory",
                str(ROOT),
                "-f",
                str(ROOT / "docker-compose.yml"),
                "-p",
                "rlad-test",
                "config",
                "-q",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "COMPOSE_PROFILES": profiles},
        )
        assert result.returncode == 0, (tool, result.stderr)


def test_the_smoke_run_starts_the_whole_cpu_stack() -> None:
    script = (ROOT / "scripts/compose_smoke.sh").read_text()
    stack = re.search(r"^STACK=\(([^)]*)\)$", script, re.M)
    trainer = re.search(r"^TRAINER=(\S+)$", script, re.M)
    assert stack and trainer, "scripts/compose_smoke.sh names what it starts: STACK, TRAINER"
    started = {*stack.group(1).split(), trainer.group(1)}
    cpu_stack = {n for n, s in SERVICES.items() if s.get("profiles", ["cpu"]) == ["cpu"]}
    # Grafana joins where its image can be had; Debian has no package to stand in for it.
    assert started == cpu_stack - {"grafana"}
