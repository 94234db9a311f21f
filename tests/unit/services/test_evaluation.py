"""Pass@k against hand-computed binomials; Mean@k, per-subset tables, JSON and PNG."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from services.bootstrap.tiny_models import build_tokenizer
from services.common.protocol import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    PromptCompletions,
)
from services.evaluation.evaluate import (
    EvalConfig,
    EvalReport,
    evaluate,
    pass_at_k,
    pass_ks,
    write_report,
)
from services.tasks import Problem, Reward


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # Pass@1 is the plain success rate
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (5, 2, 4, 1.0),  # fewer than 4 failures: any 4 samples hold a success
        (8, 1, 4, 1 - 35 / 70),  # 1 - C(7,4)/C(8,4)
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k_closed_form(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_everywhere() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_ks() -> None:
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(1) == [1]


class EchoTask:
    """Problems whose right answer is a digit; a completion is right when it is that digit."""

    name = "echo"

    def __init__(self) -> None:
        self.items = [("S1", "1"), ("S1", "2"), ("S2", "3")]

    def problems(self, split: str, seed: int = 0):  # type: ignore[no-untyped-def]
        for i, (subset, answer) in enumerate(self.items):
            yield Problem(prompt_id=f"p{i}", prompt=f"Q{answer}:", subset=subset, answer=answer)

    def reward(self, problem: Problem, completion_text: str) -> Reward:
        right = completion_text == problem.answer
        return Reward(
            score=1.0 if right else -1.0, correct=right, format_ok=len(completion_text) == 1
        )


class ScriptedGenerator:
    """Answers each prompt `Q<d>:` with a fixed list of completions (a stand-in engine)."""

    def __init__(self, tokenizer, script: dict[str, list[str]]) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer, self.script = tokenizer, script
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        self.requests.append(request)
        results = []
        assert request.prompts is not None
        for prompt in request.prompts:
            texts = self.script[self.tokenizer.decode(prompt)]
            assert len(texts) == request.sampling.n
            completions = [
                Completion(
                    token_ids=self.tokenizer.encode(t, add_special_tokens=False),
                    logprobs=[0.0] * len(t),
                    finish_reason="stop",
                )
                for t in texts
            ]
            results.append(PromptCompletions(prompt_token_ids=prompt, completions=completions))
        return GenerateResponse(policy_version=0, results=results)


def test_evaluate_per_subset(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    script = {
        "Q1:": ["1", "1", "0", "0"],  # 2 of 4 right
        "Q2:": ["0", "0", "0", "xx"],  # none right, one malformed
        "Q3:": ["3", "0", "0", "0"],  # 1 of 4 right
    }
    generator = ScriptedGenerator(tokenizer, script)
    config = EvalConfig(k=4, temperature=0.6, top_p=0.95, prompts_per_request=2, max_tokens=5)
    report = asyncio.run(evaluate(generator, tokenizer, EchoTask(), config, model="m"))

    assert [r.sampling.temperature for r in generator.requests] == [0.6, 0.6]
    assert [len(r.prompts or []) for r in generator.requests] == [2, 1]
    s1, s2 = report.subsets
    assert (s1.subset, s1.problems, s2.subset, s2.problems) == ("S1", 2, "S2", 1)
    assert s1.mean_at_k == pytest.approx(2 / 8)
    # Pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6 and 0 -> mean 5/12.
    assert s1.pass_at == pytest.approx({1: 0.25, 2: 5 / 12, 4: 0.5})
    assert s1.format_rate == pytest.approx(7 / 8)
    assert s1.mean_reward == pytest.approx((2 - 6) / 8)
    assert s2.pass_at == pytest.approx({1: 0.25, 2: 0.5, 4: 1.0})
    assert report.overall.problems == 3
    assert report.overall.mean_at_k == pytest.approx(3 / 12)

    json_path, png_path = write_report(report, tmp_path / "out")
    assert EvalReport.model_validate(json.loads(json_path.read_text())) == report
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limit_per_subset() -> None:
    tokenizer = build_tokenizer()
    generator = ScriptedGenerator(tokenizer, {"Q1:": ["1"], "Q3:": ["0"]})
    config = EvalConfig(k=1, limit_per_subset=1)
    report = asyncio.run(evaluate(generator, tokenizer, EchoTask(), config, model="m"))
    assert [(s.subset, s.problems, s.mean_at_k) for s in report.subsets] == [
        ("S1", 1, 1.0),
        ("S2", 1, 0.0),
    ]
