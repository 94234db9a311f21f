"""An OpenAI-compatible teacher (`openai+http://…/v1`): the completions request, reading
answers of the shape vLLM 0.32 gives (recorded from `vllm serve`), and `TeacherClient`'s
errors against an app on loopback that answers like vLLM, or not at all like it. The
same client against a real `vllm serve` is tests/integration/test_teacher_openai_server.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from services.clients.discovery import expand_teacher_urls
from services.clients.openai_teacher import CompletionsAnswer, OpenAiApi, scores_from_answer
from services.clients.teacher import TeacherClient, TeacherRequestError, TeacherUnavailable
from services.common.protocol import ScoreRequest, ScoreSequence, ServerInfo
from services.common.tokenizer_check import (
    PROBE_TEXT,
    TokenizerMismatch,
    check_compatible,
    probe_digest,
    tokenizer_probe,
)
from services.config.base import ConfigError
from services.config.workers import parse_teacher_url
from tests.server_support import ThreadedServer

# `POST /v1/completions {"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}` on
# the tiny teacher (vllm serve 0.32, float32), trimmed to the fields read.
RECORDED = {
    "id": "cmpl-b0461421bbf77253",
    "object": "text_completion",
    "model": "/models/teacher",
    "choices": [
        {
            "index": 0,
            "text": "{",
            "finish_reason": "length",
            "prompt_logprobs": [
                None,
                {
                    "6": {"logprob": -5.1641, "rank": 102, "decoded_token": "3"},
                    "78": {"logprob": -4.1040, "rank": 1, "decoded_token": "."},
                    "62": {"logprob": -4.1987, "rank": 2, "decoded_token": "X"},
                },
                {
                    "7": {"logprob": -5.1764, "rank": 103, "decoded_token": "4"},
                    "78": {"logprob": -4.0544, "rank": 1, "decoded_token": "."},
                    "102": {"logprob": -4.2039, "rank": 2, "decoded_token": ""},
                },
                {  # the prompt's own token is among the top 2: two entries, not three
                    "78": {"logprob": -4.1296, "rank": 1, "decoded_token": "."},
                    "8": {"logprob": -4.2047, "rank": 2, "decoded_token": "5"},
                },
            ],
        }
    ],
    "usage": {"prompt_tokens": 4, "total_tokens": 5, "completion_tokens": 1},
}
SEQUENCE = ScoreSequence(token_ids=[5, 6, 7, 8], start=2)


def _answer(data: dict[str, Any]) -> CompletionsAnswer:
    return CompletionsAnswer.model_validate_json(json.dumps(data))


def test_the_request_is_the_token_ids_with_prompt_logprobs_and_one_token() -> None:
    call = OpenAiApi().score(ScoreRequest(sequences=[SEQUENCE, SEQUENCE], top_k=3))
    assert (call.request.method, call.request.path) == ("POST", "/v1/completions")
    assert call.request.body is not None
    assert json.loads(call.request.body) == {
        "prompt": [[5, 6, 7, 8], [5, 6, 7, 8]],
        "max_tokens": 1,
        "prompt_logprobs": 3,
    }
    assert call.request.headers["content-type"] == "application/json"


def test_logprobs_and_ranked_top_k_are_read_from_prompt_logprobs() -> None:
    response = scores_from_answer(_answer(RECORDED), [SEQUENCE], top_k=2)
    assert response.revision == response.model == "/models/teacher"
    (scores,) = response.scores
    # positions 2 and 3 (start=2): tokens 7 and 8, each under its own key
    assert scores.logprobs == [-5.1764, -4.2047]
    # position 2: token 7 is ranked 103, so it rides along beside the top 2 and is left out;
    # position 3: token 8 is itself the second
    assert scores.top_k_ids == [[78, 102], [78, 8]]
    assert scores.top_k_logprobs == [[-4.0544, -4.2039], [-4.1296, -4.2047]]
    without_top_k = scores_from_answer(_answer(RECORDED), [SEQUENCE], top_k=0).scores[0]
    assert without_top_k.logprobs == [-5.1764, -4.2047] and without_top_k.top_k_ids is None


def _garbled(change: str) -> dict[str, Any]:
    data = json.loads(json.dumps(RECORDED))
    choice = data["choices"][0]
    if change == "two choices":
        data["choices"].append({**choice, "index": 1})
    elif change == "no prompt_logprobs":
        choice["prompt_logprobs"] = None
    elif change == "a position short":
        choice["prompt_logprobs"].pop()
    elif change == "own token missing":
        del choice["prompt_logprobs"][2]["7"]
    elif change == "too many entries":
        choice["prompt_logprobs"][3] |= {"1": {"logprob": -9.0, "rank": 90}, "2": {"logprob": -9.1}}
    return data


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("two choices", "choices are numbered [0, 1] for 1 prompts"),
        ("no prompt_logprobs", "prompt_logprobs has none positions for a prompt of 4 tokens"),
        ("a position short", "prompt_logprobs has 3 positions for a prompt of 4 tokens"),
        ("own token missing", "prompt_logprobs[2] lacks the prompt's own token 7"),
        ("too many entries", "prompt_logprobs[3] has 4 entries for prompt_logprobs=2"),
    ],
)
def test_an_answer_that_does_not_fit_the_prompts_is_refused(change: str, says: str) -> None:
    with pytest.raises(ValueError) as error:
        scores_from_answer(_answer(_garbled(change)), [SEQUENCE], top_k=2)
    assert says in str(error.value)


# ------------------------------------------------------------ through TeacherClient


class FakeVllm:
    """An app on loopback that answers like `vllm serve`, or as `mode` says."""

    def __init__(self) -> None:
        self.mode = "vllm"
        self.health_checks = 0
        self.app = FastAPI()
        self.app.post("/v1/completions")(self.completions)
        self.app.get("/v1/models")(self.models)
        self.app.post("/tokenize")(self.tokenize)
        self.app.get("/health")(self.health)

    def health(self) -> Response:
        # vLLM's /health sits beside /v1, not under it; 503 once its engine has died
        self.health_checks += 1
        return Response(status_code=503 if self.mode == "engine dead" else 200)

    def completions(self) -> Response:
        if self.mode == "garbled":  # a 200 that is no completions answer
            return JSONResponse({"status": "ok"})
        if self.mode in ("out of vocabulary", "max logprobs"):
            message = {
                "out of vocabulary": "Token id 128 is out of vocabulary",
                "max logprobs": "Requested prompt logprobs of 30, which is greater than max "
                "allowed: 20 (parameter=prompt_logprobs, value=30)",
            }[self.mode]
            error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        return JSONResponse(RECORDED)

    def models(self) -> dict[str, Any]:
        card = {"id": "/models/teacher", "object": "model", "max_model_len": 512}
        return {"object": "list", "data": [card]}

    def tokenize(self) -> Response:
        if self.mode == "no tokenize":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        # what vLLM answers for PROBE_TEXT with add_special_tokens false, return_token_strs
        return JSONResponse({"count": 2, "max_model_len": 512, "tokens": [7, 8],
                             "token_strs": ["a", "b"]})  # fmt: skip


@pytest.fixture(scope="module")
def fake_vllm() -> Iterator[tuple[FakeVllm, str]]:
    fake = FakeVllm()
    with ThreadedServer(fake.app, header_timeout_s=10) as server:
        yield fake, f"openai+{server.url}/v1"


def _run(url: str, call: str, top_k: int = 2) -> Any:
    async def go() -> Any:
        async with TeacherClient([url], deadline_s=2, health_interval_s=0) as client:
            if call == "info":
                return await client.info()
            return await client.score([SEQUENCE], top_k=top_k)

    return asyncio.run(go())


def test_the_client_scores_and_describes_an_openai_server(
    fake_vllm: tuple[FakeVllm, str],
) -> None:
    fake, url = fake_vllm
    fake.mode = "vllm"
    assert _run(url, "score").scores[0].top_k_ids == [[78, 102], [78, 8]]
    info = _run(url, "info")
    assert (info.backend, info.model, info.revision) == (
        "openai",
        "/models/teacher",
        "/models/teacher",
    )
    assert info.max_model_len == 511  # one position left for the token vLLM must generate
    assert info.tokenizer_fingerprint is None and info.vocab_size is None
    assert info.tokenizer_probe == probe_digest([7, 8], ["a", "b"])
    fake.mode = "no tokenize"
    assert _run(url, "info").tokenizer_probe is None  # said by the check, see below


def test_health_checks_read_vllms_health_route(fake_vllm: tuple[FakeVllm, str]) -> None:
    fake, url = fake_vllm

    async def health_checks_find(expected: bool) -> bool:
        """Whether the client says `expected` once vLLM's /health has answered it twice
        (within 10 s: a loaded machine may delay the first checks)."""
        async with TeacherClient([url], health_interval_s=0.05) as client:
            checked = fake.health_checks
            for _ in range(100):
                await asyncio.sleep(0.1)
                if fake.health_checks >= checked + 2:
                    break
            return client.reachable() == expected

    fake.mode = "vllm"
    assert asyncio.run(health_checks_find(True))
    fake.mode = "engine dead"
    assert asyncio.run(health_checks_find(False))


def test_a_200_that_is_not_a_completions_answer_says_what_to_fix(
    fake_vllm: tuple[FakeVllm, str],
) -> None:
    fake, url = fake_vllm
    fake.mode = "garbled"
    with pytest.raises(TeacherUnavailable) as error:
        _run(url, "score")
    message = str(error.value)
    assert "HTTP 200 with an answer that is not a valid completions answer" in message
    assert "model: Field required (and 1 more problems)" in message  # model, choices
    assert "check that the URL serves vLLM's OpenAI-compatible API (vllm serve)" in message


def test_a_400_that_blames_the_prompt_is_an_input_fault(fake_vllm: tuple[FakeVllm, str]) -> None:
    fake, url = fake_vllm
    fake.mode = "out of vocabulary"
    with pytest.raises(TeacherRequestError, match="Token id 128 is out of vocabulary") as error:
        _run(url, "score")
    assert error.value.status == 400


def test_a_400_for_the_deployment_is_not_blamed_on_the_input(
    fake_vllm: tuple[FakeVllm, str],
) -> None:
    """Over `--max-logprobs` every input is refused: dead-lettering them would be wrong."""
    fake, url = fake_vllm
    fake.mode = "max logprobs"
    with pytest.raises(TeacherUnavailable, match="whatever it carries") as error:
        _run(url, "score", top_k=30)
    assert "serve it with --max-logprobs at least the scorer's top_k" in str(error.value)


# ------------------------------------------------------------ URLs and the tokenizer check


def test_a_teacher_url_names_its_api() -> None:
    assert parse_teacher_url("openai+http://gpu:8000/v1") == ("openai", "http://gpu:8000")
    assert parse_teacher_url("openai+https://gpu:8000/") == ("openai", "https://gpu:8000")
    assert parse_teacher_url("http://gpu:8100/") == ("rlad", "http://gpu:8100")
    for wrong in ("gpu:8100", "openai://gpu:8000/v1", "openai+ftp://gpu/v1"):
        with pytest.raises(ValueError, match=r"openai\+http\(s\)://host:port/v1"):
            parse_teacher_url(wrong)
    # DNS discovery keeps the prefix on each replica it finds
    assert expand_teacher_urls(["openai+http://127.0.0.1:8000/v1"]) == [
        "openai+http://127.0.0.1:8000/v1"
    ]


def test_a_run_config_refuses_a_teacher_url_of_no_known_api(tmp_path: Any) -> None:
    from services.config.run import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "student: s\ntask: {name: kk}\nrollout_server: {}\n"
        "teacher_urls: ['openai+http://gpu:8000/v1', 'gpu:8100']\n"
    )
    with pytest.raises(ConfigError, match="teacher URL 'gpu:8100' is neither"):
        load_run_config(path)


def _info(backend: str, fingerprint: str | None, probe: str | None) -> ServerInfo:
    return ServerInfo(
        role="teacher",
        model=f"m-{backend}",
        revision="r",
        backend=backend,  # type: ignore[arg-type]
        vocab_size=None if fingerprint is None else 128,
        tokenizer_fingerprint=fingerprint,
        tokenizer_probe=probe,
        max_model_len=511,
    )


def test_the_tokenizer_check_compares_probes_when_the_teacher_has_no_fingerprint() -> None:
    student = _info("vllm", "f1", "p1")
    assert check_compatible(student, _info("openai", None, "p1")) is None
    with pytest.raises(TokenizerMismatch, match="splits of the probe text p1 vs p2"):
        check_compatible(student, _info("openai", None, "p2"))
    cannot = check_compatible(student, _info("openai", None, None))
    assert cannot is not None
    assert "cannot check that the student and the teacher share a tokenizer" in cannot
    assert "teacher 'm-openai' (openai)" in cannot and "POST /tokenize" in cannot
    # both fingerprints known: they decide, whatever the probes say
    with pytest.raises(TokenizerMismatch, match="fingerprints f1 vs f2"):
        check_compatible(student, _info("hf", "f2", "p1"))


def test_the_probe_is_what_tokenize_answers_for_the_probe_text() -> None:
    from services.bootstrap.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) > 100 and "Ġ" in strs  # the character tokenizer splits it finely
    assert tokenizer_probe(tokenizer) == probe_digest(ids, strs)


def test_the_precision_check_says_it_cannot_see_an_openai_servers_dtype() -> None:
    from services.common.precision import teacher_precision_warning

    teacher = _info("openai", None, "p1")
    warning = teacher_precision_warning(teacher, "fp32")
    assert warning is not None and "does not say what dtype it computes in" in warning
    assert "--dtype float32" in warning
    assert teacher_precision_warning(teacher, "bf16") is None  # nothing coarser than bf16 here
