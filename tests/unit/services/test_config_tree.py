"""The strict config tree: every model refuses unknown keys with the nearest valid one, the
algorithm variants keep to their own settings, old run YAMLs say what to change, and the
server commands' options are generated from their settings models."""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from services.cli.main import app
from services.cli.options import flag
from services.config.algorithm import VARIANTS, GrpoConfig, KdrlConfig, TrrdConfig
from services.config.base import ConfigError
from services.config.cluster import ClusterConfig, RoleResources, TrainerResources
from services.config.run import RunConfig, load_run_config
from services.config.servers import RolloutServerConfig, TeacherServerConfig
from services.config.task import KKTaskConfig, MathTaskConfig
from services.config.teachers import TeacherPoolConfig
from services.config.trainer import TrainerConfig
from services.config.workers import QueueConfig, RolloutWorkerConfig, ScorerConfig

BASE: dict[str, Any] = {
    "student": "s",
    "teacher": "t",
    "task": {"name": "kk", "people": [2], "rendering": "compact"},
}
RUNNER = CliRunner()


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def refusal(tmp_path: Path, config: dict[str, Any]) -> str:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert all(line.startswith(f"{path}: ") for line in message.splitlines()), message
    return message


def with_block(key: str, block: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), key: block}


def misspelt(name: str) -> str:
    return name[:-1] + ("x" if name[-1] != "x" else "y")


def models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in models_of(arg)]


def tree(model: type[BaseModel]) -> set[type[BaseModel]]:
    found = {model}
    for field in model.model_fields.values():
        for child in models_of(field.annotation):
            found |= tree(child)
    return found


def test_every_model_of_the_tree_forbids_unknown_keys() -> None:
    for model in tree(RunConfig):
        assert model.model_config.get("extra") == "forbid", model.__name__


# (the block's key in the run YAML, the block without the misspelt key, its model)
BLOCKS: list[tuple[str, dict[str, Any], type[BaseModel]]] = [
    ("", {}, RunConfig),
    ("trainer", {}, TrainerConfig),
    ("algorithm", {"name": "trrd"}, TrrdConfig),
    ("algorithm", {"name": "grpo"}, GrpoConfig),
    ("algorithm", {"name": "kdrl"}, KdrlConfig),
    ("task", BASE["task"], KKTaskConfig),
    ("task", {"name": "math", "eval_path": "e.jsonl"}, MathTaskConfig),
    ("rollout", {}, RolloutWorkerConfig),
    ("scorer", {}, ScorerConfig),
    ("queue", {}, QueueConfig),
    ("rollout_server", {}, RolloutServerConfig),
    ("teacher_server", {}, TeacherServerConfig),
    ("teacher_urls", {"name": "a", "urls": ["http://a:8100"]}, TeacherPoolConfig),
    ("cluster", {}, ClusterConfig),
    ("cluster.teacher", {}, RoleResources),
    ("cluster.trainer", {}, TrainerResources),
]
LIST_BLOCKS = {"teacher_urls"}  # a list of blocks: the misspelt key is in its first


def test_the_blocks_cover_the_tree() -> None:
    assert {model for _, _, model in BLOCKS} == tree(RunConfig)


@pytest.mark.parametrize(
    ("key", "block", "model"), BLOCKS, ids=[model.__name__ for _, _, model in BLOCKS]
)
def test_a_misspelt_key_is_named_with_the_nearest_valid_one(
    tmp_path: Path, key: str, block: dict[str, Any], model: type[BaseModel]
) -> None:
    longest = max(model.model_fields, key=len)
    typo = misspelt(longest)
    config = copy.deepcopy(BASE)
    if key in LIST_BLOCKS:
        config[key] = [{**block, typo: 1}]
        key = f"{key}.0"
    elif key:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = {**block, typo: 1}
    else:
        config[typo] = 1
    prefix = f"{key}." if key else ""
    message = refusal(tmp_path, config)
    assert message.endswith(f"unknown key {prefix}{typo} — did you mean {prefix}{longest}?")


def test_a_key_with_no_near_match_lists_the_valid_ones(tmp_path: Path) -> None:
    message = refusal(tmp_path, with_block("scorer", {"zzz": 1}))
    assert "mode, batch_groups, " in ", ".join(ScorerConfig.model_fields)
    assert message.endswith(
        f"unknown key scorer.zzz; scorer takes {', '.join(ScorerConfig.model_fields)}"
    )


FOREIGN = [
    (name, field, owner)
    for name, variant in VARIANTS.items()
    for owner, other in VARIANTS.items()
    for field in other.model_fields
    if field not in variant.model_fields
]


@pytest.mark.parametrize(("name", "field", "owner"), FOREIGN, ids=lambda v: str(v))
def test_each_algorithm_refuses_the_settings_of_another(
    tmp_path: Path, name: str, field: str, owner: str
) -> None:
    default = VARIANTS[owner].model_fields[field].default
    message = refusal(tmp_path, with_block("algorithm", {"name": name, field: default}))
    assert message.endswith(
        f"algorithm.{field} is a setting of algorithm.name {owner}, not {name}: "
        f"remove it, or set algorithm.name: {owner}"
    ), message


def test_algorithm_name_defaults_to_trrd_and_must_be_known(tmp_path: Path) -> None:
    algorithm = load_run_config(write(tmp_path, with_block("algorithm", {"alpha": 0.3}))).algorithm
    assert isinstance(algorithm, TrrdConfig) and algorithm.alpha == 0.3
    message = refusal(tmp_path, with_block("algorithm", {"name": "ppo"}))
    assert message.endswith("algorithm.name: 'ppo' is not one of trrd, grpo, kdrl")
    config = with_block("task", {"people": [2]})
    assert refusal(tmp_path, config).endswith("task.name is missing: one of kk, math")


@pytest.mark.parametrize(
    ("old", "expected"),
    [
        (
            {"rollout_server": {"extra_args": ["--max-model-len", "512"]}},
            "rollout_server.extra_args is gone: set each `rlad serve-*` flag as a field of "
            "rollout_server instead (`--max-model-len 512` becomes "
            "rollout_server.max_model_len: 512)",
        ),
        (
            {"teacher_server": {"backend": "hf", "extra_args": ["--inject-latency-ms", "9"]}},
            "teacher_server.extra_args is gone: set each `rlad serve-*` flag as a field of "
            "teacher_server instead",
        ),
        (
            {"trainer": {"temperature": 0.7}},
            "trainer.temperature moved to rollout.temperature: one temperature, read by "
            "sampling and by the trainer's logprobs alike",
        ),
        (
            {"task": {"name": "kk", "kk": {"people": [2, 3]}}},
            "task.kk is gone: put its keys directly under task, next to task.name: kk",
        ),
        (
            {"task": {"name": "math", "math": {"eval_path": "e.jsonl"}}},
            "task.math is gone: put its keys directly under task, next to task.name: math",
        ),
        (
            {"queue": {"redis_url": "redis://r:6379/0"}},
            "queue.redis_url is gone: give each process --redis-url or REDIS_URL",
        ),
        (
            {"algorithm": {"name": "grpo", "alpha": 1.0}},
            "algorithm.alpha is a setting of algorithm.name trrd, not grpo",
        ),
        (
            {"rollout_server": {"model": "other"}},
            "rollout_server.model is `student`: set only `student`",
        ),
        (
            {"teacher": None, "teacher_urls": ["http://t:8000"], "teacher_server": {}},
            "teacher_server configures a local teacher: set `teacher` too",
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_old_run_yamls_say_what_to_change(
    tmp_path: Path, old: dict[str, Any], expected: str
) -> None:
    message = refusal(tmp_path, {**BASE, **old})
    assert expected in message, message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = {**BASE, "trainer": {"lr": -1, "stepz": 3}, "rollout": {"top_p": 2}}
    lines = refusal(tmp_path, config).splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "trainer.lr: Input should be greater than 0",
        "unknown key trainer.stepz — did you mean trainer.steps?",
        "rollout.top_p: Input should be less than or equal to 1",
    ]


def test_one_temperature_for_sampling_and_training(tmp_path: Path) -> None:
    run = load_run_config(write(tmp_path, {**BASE, "rollout": {"temperature": 0.7}}))
    assert run.rollout.temperature == 0.7
    assert "temperature" not in type(run.trainer).model_fields


def test_server_blocks_serve_the_run_models_and_round_trip(tmp_path: Path) -> None:
    config = {**BASE, "rollout_server": {"backend": "hf"}, "teacher_server": {"port": 9}}
    run = load_run_config(write(tmp_path, config))
    assert (run.rollout_server.model, run.rollout_server.backend) == ("s", "hf")
    assert run.teacher_server is not None
    assert (run.teacher_server.model, run.teacher_server.port) == ("t", 9)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    assert load_run_config(dumped) == run
    remote = load_run_config(
        write(tmp_path, {**BASE, "teacher": None, "teacher_urls": ["http://u:8000"]})
    )
    assert remote.teacher_server is None


# ------------------------------------------------------------------ command line


def plain(output: str) -> str:
    """Rich's error box, reflowed into one line of words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def command_params(name: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    command = group.commands[name]  # type: ignore[attr-defined]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize(
    ("name", "model"),
    [("serve-rollout", RolloutServerConfig), ("serve-teacher", TeacherServerConfig)],
)
def test_server_options_are_generated_from_the_settings_model(
    name: str, model: type[BaseModel]
) -> None:
    params = command_params(name)
    registration = {"register", "run", "advertise_url", "pool"}  # where it announces itself
    assert set(params) == {"config", *registration, *model.model_fields}
    for field_name, field in model.model_fields.items():
        param = params[field_name]
        assert param.opts == [flag(field_name)]
        assert param.help == field.description
        assert param.default is None  # left out: the run config, the environment, the model
        shown = param.show_default
        if field.is_required() or field.default is None:
            assert shown is False, field_name
        elif isinstance(field.default, bool):
            assert param.secondary_opts == [flag(f"no_{field_name}")]
            assert shown == (flag(field_name) if field.default else flag(f"no_{field_name}"))
        else:
            assert shown == str(field.default), field_name
    assert params["port"].show_default == str(model.model_fields["port"].default)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `rlad serve-*` would serve, with neither an engine nor a socket."""
    import uvicorn

    import rollout_server.app
    import teacher_server.app

    seen: dict[str, Any] = {}

    def create_app(config: Any) -> str:
        seen["config"] = config
        return "app"

    monkeypatch.setattr(rollout_server.app, "create_app", create_app)
    monkeypatch.setattr(teacher_server.app, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: seen.update(port=port))
    return seen


def test_server_options_then_run_block_then_environment_then_defaults(
    tmp_path: Path, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAD_ROLLOUT_SEED", "5")
    monkeypatch.setenv("RLAD_ROLLOUT_MAX_MODEL_LEN", "77")
    result = RUNNER.invoke(app, ["serve-rollout", "--model", "m", "--backend", "hf"])
    assert result.exit_code == 0, result.output
    config = served["config"]
    assert (config.model, config.backend, config.seed, config.port) == ("m", "hf", 5, 8200)
    block = {"backend": "hf", "seed": 3, "require_probe": True}
    path = write(tmp_path, {**BASE, "rollout_server": block})
    argv = ["serve-rollout", "--config", str(path), "--port", "9001", "--no-require-probe"]
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 0, result.output
    config = served["config"]
    assert (config.model, config.seed, config.max_model_len) == ("s", 3, 77)
    assert (served["port"], config.require_probe) == (9001, False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve-rollout", "--model", "m", "--port", "70000"], "--port: Input should be less"),
        (
            ["serve-rollout", "--model", "m", "--port", "many"],
            "Invalid value for '--port': Input should be a valid integer",
        ),
        (["serve-rollout", "--model", "m", "--backend", "tpu"], "'tpu' is not one of 'vllm'"),
        (
            ["serve-rollout", "--model", "m", "--backend", "hf", "--kv-cache-gib", "1"],
            "kv_cache_gib applies to backend='vllm' only",
        ),
        (["serve-teacher", "--port", "1"], "--model: required"),
        (
            ["serve-teacher", "--model", "m", "--max-queue-tokens", "8"],
            "max_queue_tokens (8) must be at least max_batch_tokens",
        ),
    ],
)
def test_a_bad_server_option_is_a_clean_usage_error(
    argv: list[str], expected: str, served: dict[str, Any]
) -> None:
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert expected in plain(result.output)
    assert "Traceback" not in result.output and "config" not in served


@pytest.mark.parametrize(
    "argv",
    [
        ["up"],
        ["train"],
        ["scorer"],
        ["rollout-worker", "--rollout-url", "http://r:8000"],
        ["eval", "--model", "m"],
        ["serve-rollout"],
        ["serve-teacher"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_reading_a_run_config_refuses_a_bad_one_cleanly(
    tmp_path: Path, argv: list[str], served: dict[str, Any]
) -> None:
    path = write(tmp_path, {**BASE, "trainer": {"stpes": 3}})
    result = RUNNER.invoke(app, [*argv, "--config", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert f"{path}: unknown key trainer.stpes — did you mean trainer.steps?" in plain(
        result.output
    )
    assert "Traceback" not in result.output
