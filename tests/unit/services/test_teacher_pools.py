"""Teacher pools: the config that names them (a plain list stays one pool; names unique,
each pool non-empty, no task routed to two pools, every group of the run's task has a pool),
routing a group to its pool, URLs given on the command line, and the pinned revisions."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from services.cli.main import app
from services.clients.teacher_pools import NoTeacherPool, TeacherPool, TeacherPools, with_urls
from services.common.protocol import CompletionRecord, RolloutGroup
from services.config.base import ConfigError
from services.config.run import RunConfig, load_run_config
from services.config.teachers import TeacherPoolConfig

BASE: dict[str, Any] = {"student": "s", "task": {"name": "kk", "people": [2, 3, 8]}}
MATH = {"name": "math", "urls": ["http://10.0.0.5:8100"], "tasks": ["math"]}
LOGIC = {"name": "logic", "urls": ["http://10.0.0.6:8100", "http://10.0.0.7:8100"], "weight": 1}


def load(tmp_path: Path, **keys: Any) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(BASE), **keys}))
    return load_run_config(path)


def refusal(tmp_path: Path, **keys: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **keys)
    return str(caught.value).partition(": ")[2]


def test_a_plain_list_of_urls_is_the_one_pool_default(tmp_path: Path) -> None:
    run = load(tmp_path, teacher_urls=["http://a:8000", "http://b:8000"])
    (pool,) = run.teacher_urls
    assert (pool.name, pool.urls, pool.tasks, pool.share) == (
        "default",
        ["http://a:8000", "http://b:8000"],
        [],
        1.0,
    )
    assert run.teacher_revisions == {}
    pinned = load(tmp_path, teacher_urls=["http://a"], trainer={"teacher_revision": "abc"})
    assert pinned.teacher_revisions == {"default": "abc"}


def test_pools_with_routes_and_weights_parse_and_round_trip(tmp_path: Path) -> None:
    run = load(
        tmp_path,
        teacher_urls=[MATH, LOGIC],
        trainer={"teacher_revision": {"math": "m1", "logic": "l1"}},
    )
    assert [p.name for p in run.teacher_urls] == ["math", "logic"]
    assert [p.share for p in run.teacher_urls] == [0.0, 1.0]  # tasks only / the rest
    assert run.teacher_revisions == {"math": "m1", "logic": "l1"}
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    assert load_run_config(dumped) == run


@pytest.mark.parametrize(
    ("teacher_urls", "trainer", "expected"),
    [
        (
            ["http://a", MATH],
            {},
            "teacher_urls: teacher_urls is either a list of URLs (one teacher) or a list of "
            "pools (each with name and urls), not both",
        ),
        ([{**MATH, "urls": []}], {}, "teacher_urls.0.urls: a teacher pool needs at least one URL"),
        ([MATH, {**LOGIC, "name": "math"}], {}, "teacher pool name 'math' is used twice"),
        (
            [{**MATH, "tasks": ["kk"]}, {**LOGIC, "tasks": ["kk"]}],
            {},
            "task 'kk' is routed to teacher pools 'math' and 'logic': route each task to one pool",
        ),
        (
            [MATH],
            {},
            "no teacher pool takes every group of task 'kk' (pools math route only some "
            "tasks): add 'kk' to a pool's tasks, or give a pool a weight",
        ),
        (
            [{**MATH, "tasks": [], "weight": 0}],
            {},
            "teacher_urls.0: teacher pool 'math' takes no groups: give it `tasks` or a weight",
        ),
        ([{**MATH, "tasks": ["kk/PPL 8"]}], {}, "'kk/PPL 8' is not a task name"),
        ([{**MATH, "name": "a=b"}], {}, "teacher_urls.0.name: String should match pattern"),
        (
            [MATH, LOGIC],
            {"teacher_revision": "abc"},
            "trainer.teacher_revision is one revision, but the run has teacher pools math, "
            "logic: give a revision per pool",
        ),
        (
            [MATH, LOGIC],
            {"teacher_revision": {"maths": "abc"}},
            "trainer.teacher_revision names maths, which is no teacher pool of this run",
        ),
        ([{**MATH, "taks": ["kk"]}], {}, "unknown key teacher_urls.0.taks — did you mean"),
    ],
)
def test_a_bad_pool_config_is_refused_saying_what_to_change(
    tmp_path: Path, teacher_urls: list[Any], trainer: dict[str, Any], expected: str
) -> None:
    assert expected in refusal(tmp_path, teacher_urls=teacher_urls, trainer=trainer)


def test_a_subset_rule_beside_its_task_rule_is_not_a_conflict(tmp_path: Path) -> None:
    run = load(
        tmp_path,
        teacher_urls=[{**MATH, "tasks": ["kk"]}, {**LOGIC, "tasks": ["kk/PPL8"], "weight": None}],
    )
    assert [p.tasks for p in run.teacher_urls] == [["kk"], ["kk/PPL8"]]


# ------------------------------------------------------------------ routing


def group(group_id: str, task: str = "kk", subset: str | None = "PPL3") -> RolloutGroup:
    return RolloutGroup(
        group_id=group_id,
        prompt_id="p",
        task=task,
        subset=subset,
        policy_version=0,
        prompt_token_ids=[1],
        completions=[
            CompletionRecord(token_ids=[2], rollout_logprobs=[-1.0], reward=0, finish_reason="stop")
        ],
    )


def pools(*configs: dict[str, Any]) -> TeacherPools:
    # Routing reads only the configs: no client is called here.
    return TeacherPools([TeacherPool(TeacherPoolConfig(**c), client=None) for c in configs])


def test_the_most_specific_task_rule_wins() -> None:
    routed = pools(
        {"name": "logic", "urls": ["http://u:8100"], "tasks": ["kk"]},
        {"name": "big", "urls": ["http://v:8100"], "tasks": ["kk/PPL8"]},
        {"name": "math", "urls": ["http://w:8100"], "tasks": ["math"]},
    )
    assert routed.route(group("a", subset="PPL3")).name == "logic"
    assert routed.route(group("b", subset="PPL8")).name == "big"
    assert routed.route(group("c", subset=None)).name == "logic"  # no subset recorded
    assert routed.route(group("d", task="math", subset="algebra")).name == "math"
    with pytest.raises(NoTeacherPool, match="no teacher pool takes task 'gsm8k'"):
        routed.route(group("e", task="gsm8k", subset=None))


def test_unrouted_groups_are_shared_by_weight_the_same_way_every_time() -> None:
    routed = pools(
        {"name": "math", "urls": ["http://u:8100"], "tasks": ["math"]},
        {"name": "heavy", "urls": ["http://v:8100"], "weight": 3.0},
        {"name": "light", "urls": ["http://w:8100"], "weight": 1.0},
    )
    names = [routed.route(group(f"g{i}")).name for i in range(4000)]
    shares = Counter(names)
    assert set(shares) == {"heavy", "light"}  # tasks only: math takes no kk group
    assert shares["heavy"] / len(names) == pytest.approx(0.75, abs=0.03)
    # A group sent again (a retry, another scorer) goes to the same pool.
    assert [routed.route(group(f"g{i}")).name for i in range(4000)] == names


def test_a_batch_is_split_by_pool_before_any_call() -> None:
    routed = pools(
        {"name": "math", "urls": ["http://u:8100"], "tasks": ["math"]},
        {"name": "logic", "urls": ["http://v:8100"], "tasks": ["kk"]},
    )
    batch = [group("k1"), group("m1", task="math"), group("k2")]
    parts = {pool.name: [g.group_id for g in part] for pool, part in routed.split(batch)}
    assert parts == {"math": ["m1"], "logic": ["k1", "k2"]}
    with pytest.raises(NoTeacherPool):
        routed.split([*batch, group("x", task="other")])


# ------------------------------------------------------------------ URLs given at start


def configured(*configs: dict[str, Any]) -> list[TeacherPoolConfig]:
    return [TeacherPoolConfig(**c) for c in configs]


def test_urls_given_at_start_replace_the_configured_ones_pool_by_pool() -> None:
    two = configured(MATH, LOGIC)
    assert with_urls(two, []) == two
    moved = with_urls(two, ["math=http://m:1", "math=http://m:2"])
    assert [p.urls for p in moved] == [["http://m:1", "http://m:2"], LOGIC["urls"]]
    assert moved[0].tasks == ["math"]  # the routes stay the config's
    (one,) = with_urls(configured(MATH), ["http://x:1"])  # one pool: plain URLs are its
    assert (one.name, one.urls) == ("math", ["http://x:1"])
    (local,) = with_urls([], ["http://127.0.0.1:9"])  # a local teacher: the pool default
    assert (local.name, local.urls) == ("default", ["http://127.0.0.1:9"])
    (query,) = with_urls([], ["http://t:1/?a=b"])  # `=` in a URL is no pool name
    assert query.urls == ["http://t:1/?a=b"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["http://x:1"], "the run has teacher pools math, logic: say which pool each URL"),
        (["maths=http://x:1"], "no teacher pool named maths in the config"),
        (["math=http://x:1", "http://y:1"], "either all as NAME=URL or all as plain URLs"),
    ],
)
def test_urls_given_at_start_that_fit_no_pool_are_refused(given: list[str], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        with_urls(configured(MATH, LOGIC), given)


def test_the_scorer_refuses_urls_that_fit_no_pool_with_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(BASE), "teacher_urls": [MATH, LOGIC]}))
    result = CliRunner().invoke(
        app, ["scorer", "--config", str(path), "--teacher-url", "http://x:1"]
    )
    assert result.exit_code == 2, result.output
    assert "say which pool each URL serves, as NAME=URL (e.g. math=http://x:1)" in " ".join(
        re.sub(r"[│╭╮╰╯─]", " ", result.output).split()
    )
