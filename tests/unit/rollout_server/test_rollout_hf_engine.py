"""The transformers engine in-process: sampling logprobs equal a forward pass, seeds
reproduce, updates are exact and versioned, refused updates change nothing, and an
update with in_flight_policy='abort' cuts running generations without mixing versions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from transformers import PreTrainedModel

from rollout_server.backends import load_engine
from rollout_server.rollout_engine import completion_budgets
from rollout_server.versioned import VersionedEngine
from services.common.http_server import ApiError
from services.common.logprobs import sequence_logprobs
from services.common.protocol import (
    GenerateRequest,
    GenerateResponse,
    SamplingParams,
    WeightProbe,
    WeightUpdateRequest,
    WeightUpdateResponse,
)
from services.config.servers import RolloutServerConfig
from services.weights.probe import make_probe, probe_token_ids
from services.weights.safetensors_io import encode_chunks

Perturb = Callable[..., PreTrainedModel]  # the `perturbed` fixture

T = TypeVar("T")
PROMPTS = [[10, 11, 12, 13], [40, 41]]


class Harness:
    """One engine and the one event loop it lives on."""

    def __init__(self, engine: VersionedEngine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def push(
        self, model: PreTrainedModel, version: int, probe: WeightProbe | None = None
    ) -> WeightUpdateResponse:
        async def chunks():
            for chunk in encode_chunks(model.state_dict())[1]:
                yield bytes(chunk)

        request = WeightUpdateRequest(version=version, probe=probe)
        return self.run(self.engine.update_weights_from_upload(chunks(), request))

    def sample(self, **sampling: Any) -> GenerateResponse:
        request = GenerateRequest(prompts=PROMPTS, sampling=SamplingParams(**sampling))
        return self.run(self.engine.generate(request))


@pytest.fixture(scope="module")
def harness(tied_student: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    config = RolloutServerConfig(
        model=str(tied_student),
        backend="hf",
        require_checksum=False,
        in_flight_policy="abort",
        work_dir=tmp_path_factory.mktemp("work"),
    )
    engine = load_engine(config)
    assert isinstance(engine, VersionedEngine)
    yield Harness(engine)
    engine.shutdown()


def assert_logprobs_match(model: PreTrainedModel, response: GenerateResponse, temperature: float):
    """Every sampling logprob equals the temperature-scaled forward pass of `model`."""
    for result in response.results:
        for completion in result.completions:
            ids = torch.tensor([result.prompt_token_ids + completion.token_ids])
            expected, _ = sequence_logprobs(model, ids, torch.ones_like(ids), temperature)
            tail = expected[0, len(result.prompt_token_ids) - 1 :]
            assert completion.logprobs == pytest.approx(tail.tolist(), abs=1e-4)


def test_sampling_logprobs_are_the_tempered_distribution(
    perturbed: Perturb, harness: Harness, tied_student: Path
):
    response = harness.sample(n=3, temperature=0.7, max_tokens=12, seed=1)
    assert [len(r.completions) for r in response.results] == [3, 3]
    assert all(
        c.finish_reason in ("stop", "length") for r in response.results for c in r.completions
    )
    assert response.policy_version == 0
    serving = perturbed(tied_student, seed=0, scale=0.0)  # the weights as loaded
    assert_logprobs_match(serving, response, temperature=0.7)


def test_seeded_sampling_reproduces(harness: Harness) -> None:
    first = harness.sample(n=2, temperature=1.0, max_tokens=10, seed=7)
    again = harness.sample(n=2, temperature=1.0, max_tokens=10, seed=7)
    other = harness.sample(n=2, temperature=1.0, max_tokens=10, seed=8)
    assert first == again
    assert first.results != other.results


def test_successive_updates_are_exact_and_versioned(
    perturbed: Perturb, harness: Harness, tied_student: Path
):
    ids = probe_token_ids(128, length=24)
    start = harness.engine.gate.version
    for step in (1, 2, 3):
        model = perturbed(tied_student, seed=100 + step)
        probe = make_probe(model, ids, atol=1e-4)
        result = harness.push(model, start + step, probe)
        assert result.policy_version == start + step
        assert result.probe_max_abs_diff is not None and result.probe_max_abs_diff <= 1e-4
        response = harness.sample(n=2, temperature=0.9, max_tokens=8, seed=step)
        assert response.policy_version == start + step
        assert_logprobs_match(model, response, temperature=0.9)
    assert harness.engine.info().policy_version == start + 3


def test_refused_updates_leave_the_old_weights_serving(
    perturbed: Perturb, harness: Harness, tied_student: Path
):
    before = harness.sample(n=2, temperature=1.0, max_tokens=8, seed=3)
    info = harness.engine.info()
    wrong = make_probe(perturbed(tied_student, seed=998), probe_token_ids(128))
    with pytest.raises(ApiError) as caught:
        harness.push(perturbed(tied_student, seed=999), info.policy_version + 1, wrong)
    assert (caught.value.status, caught.value.type) == (422, "probe_mismatch")
    with pytest.raises(ApiError) as stale:
        harness.push(perturbed(tied_student, seed=999), info.policy_version)
    assert stale.value.status == 409
    assert harness.engine.info() == info
    assert harness.sample(n=2, temperature=1.0, max_tokens=8, seed=3) == before


def test_abort_policy_cuts_running_generation_on_its_own_version(
    perturbed: Perturb, harness: Harness, tied_student: Path
) -> None:
    old = perturbed(tied_student, seed=200)
    harness.push(old, harness.engine.gate.version + 1)
    old_version = harness.engine.gate.version
    new = perturbed(tied_student, seed=201)

    async def generate_while_updating() -> tuple[GenerateResponse, WeightUpdateResponse]:
        request = GenerateRequest(
            prompts=[[5, 6, 7]], sampling=SamplingParams(n=2, max_tokens=250, seed=4)
        )
        generation = asyncio.create_task(harness.engine.generate(request))
        await asyncio.sleep(0.1)  # let it start producing tokens

        async def chunks():
            for chunk in encode_chunks(new.state_dict())[1]:
                yield bytes(chunk)

        update = asyncio.create_task(
            harness.engine.update_weights_from_upload(
                chunks(), WeightUpdateRequest(version=old_version + 1)
            )
        )
        return await generation, await update

    response, update = harness.run(generate_while_updating())
    assert update.policy_version == old_version + 1
    assert response.policy_version == old_version
    completions = response.results[0].completions
    assert any(c.finish_reason == "abort" for c in completions)
    assert_logprobs_match(old, response, temperature=1.0)


def test_requests_that_do_not_fit_the_model_are_refused() -> None:
    def budgets(prompts: list[list[int]], **sampling: Any) -> list[int]:
        return completion_budgets(
            prompts,
            SamplingParams(**sampling),
            vocab_size=128,
            max_model_len=16,
            max_sequences=8,
        )

    assert budgets([[1] * 10, [2] * 3], max_tokens=8) == [6, 8]
    for prompts, sampling, status in [
        ([[1] * 16], {}, 422),  # no room for one token
        ([[1, 128]], {}, 422),  # id outside the vocab
        ([[1, -1]], {}, 422),
        ([[1]], {"stop_token_ids": [500]}, 422),
        ([[1]] * 3, {"n": 3}, 413),  # 9 sequences > 8
    ]:
        with pytest.raises(ApiError) as caught:
            budgets(prompts, **sampling)
        assert caught.value.status == status
