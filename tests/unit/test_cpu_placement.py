import pytest

from services.cpu_placement import cpu_placement, placement_for_this_machine


def test_two_cores_give_the_trainer_a_core_of_its_own() -> None:
    assert cpu_placement([0, 1]) == {
        "rollout": {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1"},
        "teacher": {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1"},
        "trainer": {"OMP_NUM_THREADS": "1"},
    }


def test_many_cores_split_in_halves_in_the_order_given() -> None:
    placement = cpu_placement([4, 5, 6, 7, 8])
    assert placement["rollout"]["VLLM_CPU_OMP_THREADS_BIND"] == "4,5"
    assert placement["teacher"]["VLLM_CPU_OMP_THREADS_BIND"] == "4,5"
    assert placement["trainer"]["OMP_NUM_THREADS"] == "3"


def test_one_core_is_shared_by_everyone() -> None:
    placement = cpu_placement([3])
    assert placement["rollout"]["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    assert placement["teacher"]["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    assert placement["trainer"]["OMP_NUM_THREADS"] == "1"


def test_no_cores_is_an_error() -> None:
    with pytest.raises(ValueError, match="no cores"):
        cpu_placement([])


def test_disabled_placement_sets_nothing() -> None:
    assert placement_for_this_machine(enabled=False) == {}
