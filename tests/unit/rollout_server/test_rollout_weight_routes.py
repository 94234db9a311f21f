"""The weight routes of a served transformers engine, probed as an attacker and as an
operator on a bad day would: non-finite weights, paths outside the weights folder,
unbounded versions, probes outside the vocabulary, bogus and oversized uploads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from transformers import PreTrainedModel

from rollout_server.staging import link_or_copy
from rollout_server.versioned import VersionedEngine
from services.clients.rollout import RolloutClient
from services.common.http_server import ApiError
from services.config.run import load_run_config
from services.config.servers import RolloutServerConfig
from services.weights.push import UPLOAD_FILE, upload_headers
from services.weights.safetensors_io import encode_chunks
from tests.server_support import post_head, raw_connection, read_response

Perturb = Callable[..., PreTrainedModel]  # the `perturbed` fixture
HUGE_VERSION = "99999999999999999999999999999999999999"


def version_of(url: str) -> int:
    return int(httpx.get(f"{url}/v1/info").json()["policy_version"])


def generates(url: str) -> int:
    body = {"prompts": [[10, 11, 12]], "sampling": {"n": 2, "max_tokens": 4}}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code


def encoded(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(c) for c in encode_chunks(state)[1])


def upload(url: str, state: dict[str, torch.Tensor], version: int) -> httpx.Response:
    """`POST /v1/weights/upload` with the right sha256 and no probe."""
    headers = upload_headers(state, version, probe=None)
    return httpx.post(
        f"{url}/v1/weights/upload", content=encoded(state), headers=headers, timeout=60
    )


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize(
    ("value", "refused_by"),
    [
        (float("nan"), "model.norm.weight has 128 of 128"),  # the staged values
        (float("inf"), "model.norm.weight has 128 of 128"),
        (3e38, "the server's probe sequence"),  # finite, but the forward pass overflows
    ],
)
def test_weights_that_are_or_compute_non_finite_values_are_refused_without_a_probe(
    rollout_url: str, tied_student: Path, perturbed: Perturb, value: float, refused_by: str
) -> None:
    before = version_of(rollout_url)
    state = dict(perturbed(tied_student, seed=3).state_dict())
    state["model.norm.weight"] = torch.full((128,), value)
    response = upload(rollout_url, state, before + 1)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "weights_not_finite"
    assert refused_by in error["message"]
    assert version_of(rollout_url) == before
    assert generates(rollout_url) == 200


# ---------------------------------------------------------------- the file transport


def file_update(url: str, path: str, version: int) -> httpx.Response:
    body = {"version": version, "path": path, "sha256": {UPLOAD_FILE: "0" * 64}}
    return httpx.post(f"{url}/v1/weights", json=body, timeout=60)


def assert_refused_without_a_trace(response: httpx.Response, *secrets: str) -> None:
    """403, naming only the path given: no digest, size or existence of anything outside."""
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "outside_weights_dir"
    assert not re.search(r"[0-9a-f]{64}", response.text)
    assert "bytes" not in error["message"]
    for secret in secrets:
        assert secret not in response.text


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, str]:
    """A readable file outside the weights folder, and its sha256."""
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\x08\0\0\0\0\0\0\0{}      " + os.urandom(64))
    return secret, hashlib.sha256(secret.read_bytes()).hexdigest()


def test_the_file_transport_reads_nothing_outside_the_weights_folder(
    rollout_url: str, served_config: RolloutServerConfig, outside: tuple[Path, str]
) -> None:
    secret, digest = outside
    weights_dir = served_config.weights_dir
    assert weights_dir is not None
    weights_dir.mkdir(parents=True, exist_ok=True)
    size = str(secret.stat().st_size)
    version = version_of(rollout_url) + 1
    relative = os.path.relpath("/etc/passwd", Path.cwd())
    for path in ["/etc/passwd", "/proc/self/environ", relative, "../../../etc/passwd"]:
        assert_refused_without_a_trace(file_update(rollout_url, path, version))
    # A symlink inside the folder that leads out, to a file or to the folder holding one.
    (weights_dir / "x.safetensors").symlink_to(secret)
    (weights_dir / "leak").symlink_to(secret.parent)
    inner = weights_dir / "inner"
    inner.mkdir()
    (inner / "model.safetensors").symlink_to(secret)
    for path in ["x.safetensors", "leak", "leak/secret.safetensors", "inner"]:
        given = str(weights_dir / path)
        assert_refused_without_a_trace(file_update(rollout_url, given, version), digest, size)
    # A FIFO outside: opening it would block the request, so an answer proves no read.
    fifo = secret.parent / "fifo.safetensors"
    os.mkfifo(fifo)
    began = time.monotonic()
    assert_refused_without_a_trace(file_update(rollout_url, str(fifo), version))
    assert time.monotonic() - began < 5
    # Whether a path outside exists is not told either: the same answer, path aside.
    missing = file_update(rollout_url, str(secret.parent / "missing"), version).json()
    present = file_update(rollout_url, str(secret), version).json()
    assert (
        missing["error"]["message"].replace("missing", "secret.safetensors")
        == (present["error"]["message"])
    )
    assert version_of(rollout_url) == version - 1


def test_file_updates_inside_the_weights_folder_still_serve(
    rollout_url: str,
    served_config: RolloutServerConfig,
    tied_student: Path,
    perturbed: Perturb,
) -> None:
    assert served_config.weights_dir is not None
    model = perturbed(tied_student, seed=4)

    async def push() -> int:
        async with RolloutClient(rollout_url) as client:
            version = ((await client.info()).policy_version or 0) + 1
            result = await client.push_weights(
                model.state_dict(), version, transport="file", shared_dir=served_config.weights_dir
            )
            return result.policy_version

    assert asyncio.run(push()) == version_of(rollout_url)


def test_without_a_weights_folder_file_updates_are_off(tmp_path: Path) -> None:
    with pytest.raises(ApiError) as caught:
        link_or_copy(str(tmp_path), None, tmp_path)
    assert (caught.value.status, caught.value.type) == (403, "file_updates_off")


def test_a_runs_rollout_server_reads_where_its_trainer_writes(tmp_path: Path) -> None:
    """The trainer's file push writes under <run folder>/weights (`trainer/train.py`)."""
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "r", "run_dir": str(tmp_path), "student": "s", "task": {"name": "kk"}}
            | {"scorer": {"mode": "passthrough"}, "algorithm": {"name": "grpo"}}
        )
    )
    run = load_run_config(path)
    assert run.rollout_server.weights_dir == run.folder / "weights"
    chosen = load_run_config(path, {"rollout_server.weights_dir": "/data/w"})
    assert chosen.rollout_server.weights_dir == Path("/data/w")


# ---------------------------------------------------------------- versions and probes


def test_versions_past_int64_are_refused_and_normal_pushes_go_on(
    rollout_url: str, tied_student: Path, perturbed: Perturb
) -> None:
    before = version_of(rollout_url)
    state = dict(perturbed(tied_student, seed=5).state_dict())
    headers = {**upload_headers(state, 1, None), "x-rlad-policy-version": HUGE_VERSION}
    response = httpx.post(
        f"{rollout_url}/v1/weights/upload", content=encoded(state), headers=headers, timeout=60
    )
    assert response.status_code == 422, response.text
    assert "int64" in response.json()["error"]["message"]
    as_json = file_update(rollout_url, "x", int(HUGE_VERSION))
    assert as_json.status_code == 422 and "version" in as_json.json()["error"]["message"]
    assert version_of(rollout_url) == before
    assert upload(rollout_url, state, before + 1).status_code == 200


@pytest.mark.parametrize("token_ids", [[5, 300], [5, -3]])
def test_a_probe_outside_the_vocabulary_is_refused_before_the_body(
    rollout_url: str, token_ids: list[int]
) -> None:
    probe = f'{{"token_ids": {token_ids}, "logprobs": [-1.0]}}'
    head = post_head("/v1/weights/upload", 1 << 30, "application/octet-stream")
    head = head.replace(
        b"\r\n\r\n",
        f"\r\nx-rlad-policy-version: {version_of(rollout_url) + 1}\r\n"
        f"x-rlad-sha256: {'0' * 64}\r\nx-rlad-probe: {probe}\r\n\r\n".encode(),
    )
    with raw_connection(rollout_url, head, timeout_s=10) as sock:
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 422"), answer[:300]
    assert b"outside the vocab" in answer


# ---------------------------------------------------------------- uploads


def test_a_bogus_tensor_is_refused_from_the_header_before_its_bytes(rollout_url: str) -> None:
    """The header declares a 2 GiB tensor the model does not have; the answer comes once
    the header is in, without waiting for (or writing) its bytes."""
    header = b'{"bogus":{"dtype":"F32","shape":[536870912],"data_offsets":[0,2147483648]}}'
    header += b" " * (-len(header) % 8)
    prefix = len(header).to_bytes(8, "little") + header
    head = post_head("/v1/weights/upload", len(prefix) + 2**31, "application/octet-stream")
    head = head.replace(
        b"\r\n\r\n",
        f"\r\nx-rlad-policy-version: {version_of(rollout_url) + 1}\r\n"
        f"x-rlad-sha256: {'0' * 64}\r\n\r\n".encode(),
    )
    with raw_connection(rollout_url, head + prefix + b"\0" * 65536, timeout_s=10) as sock:
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 422"), answer[:300]
    assert b"unexpected tensor 'bogus'" in answer


def test_an_upload_larger_than_the_model_is_refused_at_the_model_size(
    rollout_url: str, served_engine: VersionedEngine, tied_student: Path, perturbed: Perturb
) -> None:
    data = encoded(dict(perturbed(tied_student, seed=6).state_dict()))
    limit = served_engine.schema.max_file_bytes
    body = data + b"\0" * (limit - len(data) + 4096)  # valid, then more than the model holds
    headers = {
        "content-type": "application/octet-stream",
        "x-rlad-policy-version": str(version_of(rollout_url) + 1),
        "x-rlad-sha256": hashlib.sha256(body).hexdigest(),
    }
    response = httpx.post(
        f"{rollout_url}/v1/weights/upload", content=body, headers=headers, timeout=60
    )
    assert response.status_code == 413, response.text
    assert f"limit of {limit} bytes" in response.json()["error"]["message"]
