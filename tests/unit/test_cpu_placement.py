import os
import subprocess
import sys

import pytest

from services.launch.cpu_placement import (
    CORES_ENV,
    available_cores,
    cpu_placement,
    placement_for_this_machine,
)


def test_two_cores_give_the_trainer_and_a_transformers_teacher_the_second() -> None:
    assert cpu_placement([0, 1], "hf") == {
        "rollout": {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1", CORES_ENV: "0"},
        "teacher": {"VLLM_CPU_OMP_THREADS_BIND": "1", "OMP_NUM_THREADS": "1", CORES_ENV: "1"},
        "trainer": {"OMP_NUM_THREADS": "1", CORES_ENV: "1"},
    }


def test_a_vllm_teacher_shares_the_rollout_engines_cores() -> None:
    placement = cpu_placement([0, 1], "vllm")
    assert placement["teacher"] == placement["rollout"]
    assert placement["trainer"][CORES_ENV] == "1"


def test_many_cores_split_in_halves_in_the_order_given() -> None:
    placement = cpu_placement([4, 5, 6, 7, 8], "hf")
    assert placement["rollout"]["VLLM_CPU_OMP_THREADS_BIND"] == "4,5"
    assert placement["teacher"][CORES_ENV] == "6,7,8"
    assert placement["trainer"] == {"OMP_NUM_THREADS": "3", CORES_ENV: "6,7,8"}


def test_one_core_is_shared_by_everyone() -> None:
    placement = cpu_placement([3], "hf")
    assert {env[CORES_ENV] for env in placement.values()} == {"3"}
    assert placement["trainer"]["OMP_NUM_THREADS"] == "1"


def test_no_cores_is_an_error() -> None:
    with pytest.raises(ValueError, match="no cores"):
        cpu_placement([], "hf")


def test_disabled_placement_sets_nothing() -> None:
    assert placement_for_this_machine(enabled=False, teacher_backend="hf") == {}


def affinity_of_a_process_with(env: dict[str, str]) -> str:
    code = (
        "import os; from services.launch.cpu_placement import pin_to_assigned_cores; "
        "pin_to_assigned_cores(); print(sorted(os.sched_getaffinity(0)))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_process_pins_itself_to_the_cores_assigned_in_its_environment() -> None:
    last = available_cores()[-1]
    assert affinity_of_a_process_with({CORES_ENV: str(last)}) == f"[{last}]"
    unassigned = {k: v for k, v in os.environ.items() if k != CORES_ENV}
    assert affinity_of_a_process_with(unassigned) == str(available_cores())
