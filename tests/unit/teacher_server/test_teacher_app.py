"""The HTTP app over the real HF engine, served on loopback: answers, every bad input,
auth, cache, admission, metrics and the OpenAPI description."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import msgpack
import pytest

from services.common import wire
from services.common.protocol import ScoreRequest, ScoreResponse, ScoreSequence, SequenceScores
from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import Reference, ThreadedServer, assert_logprobs_close, random_sequences


@pytest.fixture(scope="module")
def server(hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine) -> Iterator[ThreadedServer]:
    config = hf_config.model_copy(update={"max_body_bytes": 64 * 1024})
    with ThreadedServer(config, hf_engine) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"]
    return str(body["error"]["message"])


def _score(http: httpx.Client, sequences: Sequence[ScoreSequence], top_k: int = 0) -> ScoreResponse:
    body = ScoreRequest(sequences=list(sequences), top_k=top_k).model_dump_json()
    response = http.post("/v1/score", content=body, headers={"content-type": wire.JSON})
    assert response.status_code == 200, response.text
    return ScoreResponse.model_validate_json(response.content)


def test_json_and_msgpack_bodies_give_the_reference_logprobs(
    http: httpx.Client, reference: Reference
) -> None:
    sequences = random_sequences(6, seed=10)
    as_json = _score(http, sequences)
    packed = http.post(
        "/v1/score",
        content=wire.encode(ScoreRequest(sequences=sequences)),
        headers={"content-type": wire.MSGPACK, "accept": wire.MSGPACK},
    )
    assert packed.headers["content-type"] == wire.MSGPACK
    as_msgpack = wire.decode(packed.content, ScoreResponse)
    assert as_msgpack == as_json  # float32 values survive both encodings exactly
    for seq, scores in zip(sequences, as_json.scores, strict=True):
        assert_logprobs_close(scores.logprobs, reference.logprobs(seq))


def test_info_names_model_revision_vocab_fingerprint_and_length(
    http: httpx.Client, hf_engine: HFTeacherEngine
) -> None:
    info = http.get("/v1/info").json()
    assert info == hf_engine.info().model_dump()
    assert info["vocab_size"] == 128 and info["max_model_len"] == 256
    assert info["dtype"] == "float32"  # the engine's, as --dtype float32 asked


BAD_INPUTS = [
    # (body, content type, status, words the message must contain)
    (b'{"sequences": [', wire.JSON, 400, "not valid JSON"),
    (b"\xc1\xff\x00", wire.MSGPACK, 400, "not valid msgpack"),
    (b"sequences", "text/plain", 415, "application/json"),
    (b'{"sequences": []}', wire.JSON, 422, "sequences"),
    (b'{"sequences": [{"token_ids": [1, 2]}, {"token_ids": []}]}', wire.JSON, 422, "sequences.1"),
    (b'{"sequences": [{"token_ids": [5]}]}', wire.JSON, 422, "at least 2 items"),
    (b'{"sequences": [{"token_ids": [1, 2, 3], "start": 3}]}', wire.JSON, 422, "sequences.0"),
    (b'{"sequences": [{"token_ids": [1, 2], "start": 0}]}', wire.JSON, 422, "sequences.0.start"),
    (b'{"sequences": [{"token_ids": [1, 2, 999]}]}', wire.JSON, 422, "sequences[0].token_ids[2]"),
    (b'{"sequences": [{"token_ids": [1, "a"]}]}', wire.JSON, 422, "sequences.0.token_ids.1"),
    (b'{"sequences": [{"token_ids": [1, 2]}], "top_k": 65}', wire.JSON, 422, "top_k"),
    (b'{"sequences": [{"token_ids": [1, 2]}], "extra": 1}', wire.JSON, 422, "extra"),
    # Strict: a bool, a numeric string or a float is no token id, and true is no top_k.
    (b'{"sequences": [{"token_ids": [true, false]}]}', wire.JSON, 422, "token_ids.0"),
    (b'{"sequences": [{"token_ids": ["5", 6]}]}', wire.JSON, 422, "token_ids.0"),
    (b'{"sequences": [{"token_ids": [5.0, 6]}]}', wire.JSON, 422, "token_ids.0"),
    (b'{"sequences": [{"token_ids": [5, 6]}], "top_k": true}', wire.JSON, 422, "top_k"),
    (msgpack.packb({"sequences": [{"token_ids": [True, 2]}]}), wire.MSGPACK, 422, "token_ids.0"),
    (
        msgpack.packb({"sequences": [{"token_ids": [1, 2], "start": 5}]}),
        wire.MSGPACK,
        422,
        "start=5",
    ),
    (msgpack.packb([1, 2]), wire.MSGPACK, 422, "invalid request"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "words"), BAD_INPUTS)
def test_bad_input_gets_a_precise_4xx(
    http: httpx.Client, body: bytes, content_type: str, status: int, words: str
) -> None:
    response = http.post("/v1/score", content=body, headers={"content-type": content_type})
    assert words in _error(response, status)


def test_media_types_are_case_insensitive(http: httpx.Client) -> None:
    body = b'{"sequences": [{"token_ids": [1, 2, 3]}]}'
    response = http.post("/v1/score", content=body, headers={"content-type": "APPLICATION/JSON"})
    assert response.status_code == 200, response.text


def test_unknown_paths_and_methods_answer_in_the_error_shape(http: httpx.Client) -> None:
    assert "Not Found" in _error(http.get("/v1/nope"), 404)
    assert "Method Not Allowed" in _error(http.get("/v1/score"), 405)


def test_oversized_input_is_refused_naming_the_limit_or_the_sequence(http: httpx.Client) -> None:
    too_long = [ScoreSequence(token_ids=[1, 2]), ScoreSequence(token_ids=[3] * 257)]
    message = _error(
        http.post(
            "/v1/score",
            content=wire.encode(ScoreRequest(sequences=too_long)),
            headers={"content-type": wire.MSGPACK},
        ),
        422,
    )
    assert "sequences[1] has 257 tokens, over max_model_len 256" in message
    many = ScoreRequest(sequences=[ScoreSequence(token_ids=[1] * 250)] * 17)  # 4250 > 4096
    message = _error(
        http.post("/v1/score", content=wire.encode(many), headers={"content-type": wire.MSGPACK}),
        413,
    )
    assert "4250 tokens in 17 sequences" in message
    huge = b'{"sequences": [{"token_ids": [' + b"1, " * 40000 + b"1]}]}"
    assert "limit of 65536 bytes" in _error(http.post("/v1/score", content=huge), 413)
    # the server keeps serving after every refusal
    assert _score(http, [ScoreSequence(token_ids=[1, 2, 3])]).scores[0].logprobs


def test_bearer_token_is_required_when_rlad_api_key_is_set(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAD_API_KEY", "s3cret")
    body = {"sequences": [{"token_ids": [1, 2, 3]}]}
    assert "bearer token" in _error(http.post("/v1/score", json=body), 401)
    wrong = {"authorization": "Bearer nope"}
    _error(http.post("/v1/score", json=body, headers=wrong), 401)
    _error(http.get("/v1/info", headers=wrong), 401)
    right = {"authorization": "Bearer s3cret"}
    assert http.post("/v1/score", json=body, headers=right).status_code == 200
    assert http.get("/health").status_code == 200  # probes stay open
    assert http.get("/metrics").status_code == 200


def test_cache_hits_return_identical_values_and_are_counted(http: httpx.Client) -> None:
    def hits() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("rlad_teacher_cache_hits_total"):
                return float(line.split()[-1])
        raise AssertionError("no cache hit metric")

    sequences = random_sequences(4, seed=20)
    before = hits()
    first = http.post("/v1/score", json=ScoreRequest(sequences=sequences, top_k=3).model_dump())
    again = http.post("/v1/score", json=ScoreRequest(sequences=sequences, top_k=3).model_dump())
    assert first.content == again.content  # byte-identical answer
    assert hits() - before == 4
    # partly cached: the known sequences hit, the new one is computed
    mixed = [*random_sequences(1, seed=21), sequences[2]]
    response = _score(http, mixed, top_k=3)
    assert response.scores[1] == ScoreResponse.model_validate_json(first.content).scores[2]
    assert hits() - before == 5


def test_metrics_count_requests_tokens_batches_and_errors(http: httpx.Client) -> None:
    _score(http, [ScoreSequence(token_ids=[7, 8, 9, 10], start=2)])
    http.post("/v1/score", content=b"{")
    text = http.get("/metrics").text
    for name in (
        'rlad_teacher_requests_total{status="200"}',
        'rlad_teacher_errors_total{kind="malformed_body"}',
        "rlad_teacher_tokens_scored_total",
        "rlad_teacher_request_latency_seconds_bucket",
        "rlad_teacher_batch_sequences_bucket",
        "rlad_teacher_queue_tokens",
        "rlad_teacher_cache_bytes",
    ):
        assert name in text, name


def test_openapi_documents_every_field_of_the_scoring_api(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    body = doc["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert set(body) == {wire.JSON, wire.MSGPACK}
    assert {"400", "401", "413", "422", "429"} <= set(
        doc["paths"]["/v1/score"]["post"]["responses"]
    )
    schemas = doc["components"]["schemas"]
    for name in ("ScoreRequest", "ScoreSequence", "ScoreResponse", "SequenceScores", "ServerInfo"):
        for field, spec in schemas[name]["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


class GatedEngine:
    """The real engine behind a gate, so a test can hold the server busy."""

    def __init__(self, engine: HFTeacherEngine) -> None:
        self.engine = engine
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def score_sequences(
        self, sequences: Sequence[ScoreSequence], top_k: int
    ) -> list[SequenceScores]:
        self.gate.wait(timeout=30)
        return self.engine.score_sequences(sequences, top_k)


def test_full_server_answers_429_with_retry_after_then_recovers(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> None:
    config = hf_config.model_copy(update={"max_queue_tokens": 1024, "cache_bytes": 0})
    gated = GatedEngine(hf_engine)
    held = ScoreRequest(sequences=[ScoreSequence(token_ids=[1] * 250)] * 4).model_dump()
    with ThreadedServer(config, gated) as server, httpx.Client(base_url=server.url) as http:  # type: ignore[arg-type]
        results: list[int] = []
        worker = threading.Thread(
            target=lambda: results.append(http.post("/v1/score", json=held, timeout=60).status_code)
        )
        worker.start()
        deadline = time.monotonic() + 10
        # 4 x 250 tokens, each padded to 256 (length_bucket 16): 1024 tokens of work
        while "rlad_teacher_queue_tokens 1024.0" not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "the held request was never admitted"
            time.sleep(0.02)
        refused = http.post("/v1/score", json={"sequences": [{"token_ids": [1] * 30}]})
        assert "retry in" in _error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
        gated.gate.set()
        worker.join(timeout=60)
        assert results == [200]
        assert (
            http.post("/v1/score", json={"sequences": [{"token_ids": [1] * 30}]}).status_code == 200
        )


def test_injected_latency_delays_every_score_request(
    hf_config: TeacherServerConfig, hf_engine: HFTeacherEngine
) -> None:
    config = hf_config.model_copy(update={"inject_latency_ms": 300.0})
    with ThreadedServer(config, hf_engine) as server, httpx.Client(base_url=server.url) as http:
        began = time.monotonic()
        assert (
            http.post("/v1/score", json={"sequences": [{"token_ids": [1, 2]}]}).status_code == 200
        )
        assert time.monotonic() - began >= 0.3
