"""Real rollout servers on loopback (`rlad serve-rollout`), driven through `RolloutClient`
and raw HTTP: a transformers server (bound to all interfaces, with an API key) for the
protocol edges, and one vLLM CPU server for exact, versioned, atomic weight updates."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import PreTrainedModel

from services.bootstrap.tiny_models import TinyModelConfig, save_tiny_model
from services.clients.rollout import RolloutClient, RolloutServerError
from services.common import wire
from services.common.logprobs import sequence_logprobs
from services.common.protocol import GenerateRequest, GenerateResponse, SamplingParams
from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.weights.probe import make_probe, probe_token_ids
from services.weights.safetensors_io import encode_chunks
from tests.model_support import perturbed_model
from tests.server_support import read_response

API_KEY = "test-key"
PROBE_IDS = probe_token_ids(128, length=24)


def assert_produced_by(model: PreTrainedModel, response: GenerateResponse, temperature: float):
    """Every sampling logprob equals the tempered forward pass of `model` (so no token came
    from other weights)."""
    for result in response.results:
        for completion in result.completions:
            ids = torch.tensor([result.prompt_token_ids + completion.token_ids])
            with torch.no_grad():
                expected, _ = sequence_logprobs(model, ids, torch.ones_like(ids), temperature)
            tail = expected[0, len(result.prompt_token_ids) - 1 :].tolist()
            assert completion.logprobs == pytest.approx(tail, abs=1e-4)


def start_server(tmp: Path, model: Path, backend: str, host: str, env: dict[str, str], *extra: str):
    port = free_port()
    argv = [sys.executable, "-m", "services.cli.main", "serve-rollout", "--model", str(model)]
    argv += ["--backend", backend, "--host", host, "--port", str(port), *extra]
    server = ManagedProcess(f"rollout-{backend}", argv, tmp / f"{backend}.log", env).start()
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=240)
    except Exception:
        server.stop()
        raise
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TinyModelConfig(tie_word_embeddings=True, max_position_embeddings=256)
    return save_tiny_model(tmp_path_factory.mktemp("models") / "student", config, seed=0)


@pytest.fixture(scope="module")
def hf_url(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("hf")
    server, url = start_server(
        tmp, student, "hf", "0.0.0.0", {"RLAD_API_KEY": API_KEY}, "--upload-idle-timeout-s", "1"
    )
    yield url
    server.stop()


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vLLM server's weights_dir: where the file transport's pushes are written."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def vllm_url(
    student: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("vllm")
    extra = ["--kv-cache-gib", "1", "--weights-dir", str(shared_dir)]
    server, url = start_server(tmp, student, "vllm", "127.0.0.1", {}, *extra)
    yield url
    server.stop()


def run(coro):
    return asyncio.run(coro)


def call(url: str, method: str, *args, key: str | None = None, **kwargs):
    """One `RolloutClient` method call on a fresh client and event loop."""

    async def go():
        async with RolloutClient(url, api_key=key) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


async def sample(url: str, key: str | None = None, **sampling) -> GenerateResponse:
    async with RolloutClient(url, api_key=key) as client:
        request = GenerateRequest(prompts=[[10, 11, 12], [40]], sampling=SamplingParams(**sampling))
        return await client.generate(request)


# ---------------------------------------------------------------- protocol edges (HF server)


BAD_BODIES = [
    ({"prompts": [[1] * 256]}, 422, "accepts at most 255"),
    ({"prompts": [[1, 2]], "sampling": {"n": 0}}, 422, "sampling.n"),
    ({"prompts": [[1, 2]], "sampling": {"temperature": -0.5}}, 422, "sampling.temperature"),
    ({"prompts": [[1, 500]]}, 422, "outside the vocab"),
    ({"prompts": [[1, -3]]}, 422, "outside the vocab"),
    ({"prompts": [[1]] * 50, "sampling": {"n": 100}}, 413, "split the batch"),
    ({"prompts": [[]]}, 422, "prompts[0] is empty"),
    ({"prompt_texts": ["hi"], "prompts": [[1]]}, 422, "exactly one of"),
    ({"prompts": [[1]], "bogus": 1}, 422, "bogus"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD_BODIES)
def test_bad_generate_requests_get_a_precise_4xx(hf_url: str, body, status: int, reason: str):
    headers = {"authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{hf_url}/v1/generate", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    msgpack = {"content-type": wire.MSGPACK, **headers}
    assert httpx.post(f"{hf_url}/v1/generate", content=b"\xc1", headers=msgpack).status_code == 400
    assert httpx.post(f"{hf_url}/v1/generate", content=b"{", headers=headers).status_code == 400
    assert httpx.get(f"{hf_url}/health").status_code == 200


def test_text_prompts_msgpack_and_info(hf_url: str, student: Path) -> None:
    async def go() -> None:
        async with RolloutClient([hf_url], api_key=API_KEY) as client:
            info = await client.info()
            assert (info.role, info.backend, info.max_model_len) == ("rollout", "hf", 256)
            request = GenerateRequest(prompt_texts=["Knights"], sampling=SamplingParams(n=2))
            response = await client.generate(request)
        completion = response.results[0].completions[0]
        assert completion.text is not None and len(completion.logprobs) == len(completion.token_ids)

    run(go())


def test_weight_endpoints_need_the_key_off_loopback(hf_url: str, student: Path) -> None:
    model = perturbed_model(student, seed=5)
    with pytest.raises(RolloutServerError) as caught:
        call(hf_url, "push_weights", model.state_dict(), version=1)
    assert caught.value.status == 401
    version = call(hf_url, "info", key=API_KEY).policy_version
    probe = make_probe(model, PROBE_IDS, atol=1e-4)
    new_version = (version or 0) + 1
    pushed = call(hf_url, "push_weights", model.state_dict(), new_version, probe, key=API_KEY)
    assert pushed.policy_version == (version or 0) + 1
    assert_produced_by(model, run(sample(hf_url, API_KEY, n=2, max_tokens=8, seed=1)), 1.0)


def raw_upload(url: str, body: bytes, declared_length: int, version: int, wait_s: float) -> bytes:
    """Send an upload by hand: `declared_length` may exceed what is sent; then wait."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/weights/upload HTTP/1.1\r\nhost: {host}\r\n"
        f"authorization: Bearer {API_KEY}\r\ncontent-type: application/octet-stream\r\n"
        f"content-length: {declared_length}\r\nx-rlad-policy-version: {version}\r\n"
        f"x-rlad-sha256: {hashlib.sha256(body).hexdigest()}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=wait_s + 10) as sock:
        sock.sendall(head.encode() + body)
        return b"" if wait_s == 0 else read_response(sock)


def test_truncated_and_stalled_uploads_fail_and_the_old_weights_serve(
    hf_url: str, student: Path
) -> None:
    before = call(hf_url, "info", key=API_KEY)
    reference = run(sample(hf_url, API_KEY, n=2, max_tokens=8, seed=2))
    data = b"".join(bytes(c) for c in encode_chunks(perturbed_model(student, 6).state_dict())[1])
    version = (before.policy_version or 0) + 1
    # The sender hangs up half-way through.
    raw_upload(hf_url, data[: len(data) // 2], len(data), version, wait_s=0)
    # The sender stalls: the server gives up after upload_idle_timeout_s (1 s) with 408.
    answer = raw_upload(hf_url, data[: len(data) // 2], len(data), version, wait_s=5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # A body shorter than its safetensors header says, but complete as HTTP.
    answer = raw_upload(hf_url, data[:-64], len(data) - 64, version, wait_s=5)
    assert answer.startswith(b"HTTP/1.1 400") and b"truncated_upload" in answer
    assert call(hf_url, "info", key=API_KEY) == before
    assert run(sample(hf_url, API_KEY, n=2, max_tokens=8, seed=2)) == reference
    metrics = httpx.get(f"{hf_url}/metrics").text
    assert 'rlad_rollout_weight_updates_total{outcome="upload_timeout",transport="http"} 1.0' in (
        metrics
    )


# ---------------------------------------------------------------- vLLM server


@pytest.mark.vllm
@pytest.mark.slow
def test_successive_pushes_serve_exactly_the_pushed_weights(
    vllm_url: str, student: Path, shared_dir: Path
) -> None:
    async def go() -> None:
        async with RolloutClient(vllm_url) as client:  # loopback: no key needed
            for version, transport in [(1, "http"), (2, "file"), (3, "http")]:
                model = perturbed_model(student, seed=10 + version)
                probe = make_probe(model, PROBE_IDS, atol=1e-4)
                result = await client.push_weights(
                    model.state_dict(), version, probe, transport=transport, shared_dir=shared_dir
                )
                assert (result.policy_version, result.transport) == (version, transport)
                assert result.probe_max_abs_diff is not None
                assert result.probe_max_abs_diff <= 1e-4
                response = await client.generate(
                    GenerateRequest(
                        prompts=[[10, 11, 12], [40]],
                        sampling=SamplingParams(n=2, temperature=0.8, max_tokens=10, seed=version),
                    )
                )
                assert response.policy_version == version
                assert [len(r.completions) for r in response.results] == [2, 2]
                assert_produced_by(model, response, temperature=0.8)
            assert (await client.info()).policy_version == 3

    run(go())
    assert list(shared_dir.iterdir()) == []  # the client cleans up its shared files


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_batch_larger_than_one_prefill(vllm_url: str) -> None:
    """More prompt tokens than one scheduler step takes (2048 on the CPU): with chunked
    prefill vLLM's CPU build died rewinding the seeded generators."""
    prompts = [[(7 * i + j) % 120 + 2 for j in range(200)] for i in range(16)]
    sampling = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=3)

    async def go() -> GenerateResponse:
        async with RolloutClient(vllm_url) as client:
            return await client.generate(GenerateRequest(prompts=prompts, sampling=sampling))

    response = run(go())
    assert [len(r.completions) for r in response.results] == [2] * 16
    assert run(sample(vllm_url, n=1, max_tokens=4)).results  # the server still answers


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_sampling_reproduces(vllm_url: str) -> None:
    def tokens(response: GenerateResponse) -> list[list[int]]:
        return [c.token_ids for r in response.results for c in r.completions]

    def logprobs(response: GenerateResponse) -> list[float]:
        return [lp for r in response.results for c in r.completions for lp in c.logprobs]

    first = run(sample(vllm_url, n=3, temperature=1.0, max_tokens=12, seed=21))
    again = run(sample(vllm_url, n=3, temperature=1.0, max_tokens=12, seed=21))
    # Same tokens; logprobs to rounding, since batch composition changes kernel rounding.
    assert tokens(again) == tokens(first)
    assert logprobs(again) == pytest.approx(logprobs(first), abs=1e-5)
    other = run(sample(vllm_url, n=3, temperature=1.0, max_tokens=12, seed=22))
    assert tokens(other) != tokens(first)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_concurrent_update_never_mixes_versions(vllm_url: str, student: Path) -> None:
    models: dict[int, PreTrainedModel] = {}

    async def go() -> list[GenerateResponse]:
        async with RolloutClient(vllm_url) as client:
            base = (await client.info()).policy_version or 0
            models[base + 1] = perturbed_model(student, seed=30)
            models[base + 2] = perturbed_model(student, seed=31)
            await client.push_weights(models[base + 1].state_dict(), base + 1)

            def long_generation(seed: int) -> asyncio.Task[GenerateResponse]:
                sampling = SamplingParams(n=8, max_tokens=250, seed=seed)
                request = GenerateRequest(prompts=[[5, 6, 7], [8, 9]], sampling=sampling)
                return asyncio.create_task(client.generate(request))

            early = [long_generation(s) for s in range(3)]
            await asyncio.sleep(0.3)  # admitted and producing tokens
            update = asyncio.create_task(
                client.push_weights(models[base + 2].state_dict(), base + 2)
            )
            during = []
            while not update.done():  # some of these wait at the gate while the update swaps
                during.append(long_generation(100 + len(during)))
                await asyncio.sleep(0.1)
            assert (await update).policy_version == base + 2
            after = [long_generation(200 + s) for s in range(2)]
            early_responses = await asyncio.gather(*early)
            assert {r.policy_version for r in early_responses} == {base + 1}
            after_responses = await asyncio.gather(*after)
            assert {r.policy_version for r in after_responses} == {base + 2}
            return [*early_responses, *after_responses, *await asyncio.gather(*during)]

    for response in run(go()):
        assert [len(r.completions) for r in response.results] == [8, 8]
        assert_produced_by(models[response.policy_version], response, temperature=1.0)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_rejected_update_leaves_the_previous_version_serving(
    vllm_url: str, student: Path
) -> None:
    serving = perturbed_model(student, seed=39)
    version = (call(vllm_url, "info").policy_version or 0) + 1
    call(vllm_url, "push_weights", serving.state_dict(), version)
    before = call(vllm_url, "info")
    sent, other = perturbed_model(student, seed=40), perturbed_model(student, seed=41)
    for state, probe, kind in [
        (sent.state_dict(), make_probe(other, PROBE_IDS), "probe_mismatch"),  # loaded, rolled back
        ({**sent.state_dict(), "model.norm.weight": torch.ones(64)}, None, "weights_mismatch"),
        (
            {k: v for k, v in sent.state_dict().items() if "layers.1" not in k},
            None,
            "weights_mismatch",
        ),
    ]:
        with pytest.raises(RolloutServerError) as caught:
            call(vllm_url, "push_weights", state, version + 1, probe)
        assert (caught.value.status, caught.value.type) == (422, kind)
    with pytest.raises(RolloutServerError) as stale:
        call(vllm_url, "push_weights", sent.state_dict(), version)
    assert stale.value.status == 409
    assert call(vllm_url, "info") == before
    after = run(sample(vllm_url, n=2, temperature=1.0, max_tokens=10, seed=5))
    assert after.policy_version == version
    assert_produced_by(serving, after, temperature=1.0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "reason"), BAD_BODIES[:5])
def test_vllm_refuses_bad_requests_and_keeps_serving(vllm_url: str, body, status, reason):
    response = httpx.post(f"{vllm_url}/v1/generate", json=body)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    metrics = httpx.get(f"{vllm_url}/metrics").text
    assert "rlad_rollout_policy_version" in metrics
    assert json.loads(httpx.get(f"{vllm_url}/health").text) == {"status": "ok"}
