"""Which cores each process of `rlad up` uses on a machine without a GPU.

Left alone, vLLM's CPU build binds each engine's OpenMP threads to the first core it sees,
and each engine's worker keeps polling for work for a second after every request, while
the trainer's torch starts one thread per core on top: the trainer, the stage with the most
compute per step, got a fraction of a core. Here the rollout engine gets the first half of
the cores and the trainer the other half. The teacher goes where it costs least: a vLLM
teacher (which polls) beside the rollout engine, a transformers teacher (`backend: hf`,
which only computes while it scores) beside the trainer, which waits for batches anyway.
Each process is pinned to its cores (`RLAD_CPU_CORES`, applied by `pin_to_assigned_cores`
as the `rlad` command starts): left to the OS, the teacher often landed beside the rollout
engine and doubled the step time (docs/operations.md#cores-on-a-machine-without-a-gpu).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CORES_ENV = "RLAD_CPU_CORES"


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_placement(cores: Sequence[int], teacher_backend: str) -> dict[str, dict[str, str]]:
    """Environment per process name ("rollout", "teacher", "trainer") for `cores`."""
    if not cores:
        raise ValueError("no cores to place the pipeline on")
    half = max(len(cores) // 2, 1)
    generation, training = list(cores[:half]), list(cores[half:]) or list(cores)
    rollout = _engine(generation)
    return {
        "rollout": rollout,
        "teacher": dict(rollout) if teacher_backend == "vllm" else _engine(training),
        "trainer": {"OMP_NUM_THREADS": str(len(training)), CORES_ENV: _id_list(training)},
    }


def placement_for_this_machine(enabled: bool, teacher_backend: str) -> dict[str, dict[str, str]]:
    """The CPU placement when enabled and no GPU is visible; nothing to set otherwise."""
    import torch

    if not enabled or torch.cuda.is_available():
        return {}
    return cpu_placement(available_cores(), teacher_backend)


def pin_to_assigned_cores() -> None:
    """Pin this process (and the threads and processes it starts later) to the cores that
    `rlad up` assigned it; nothing when it assigned none."""
    assigned = os.environ.get(CORES_ENV)
    if assigned:
        os.sched_setaffinity(0, {int(core) for core in assigned.split(",")})


def _engine(cores: list[int]) -> dict[str, str]:
    # vLLM binds its OpenMP threads to the listed cores; a transformers engine sizes its
    # thread pool from OMP_NUM_THREADS.
    ids = _id_list(cores)
    return {"VLLM_CPU_OMP_THREADS_BIND": ids, "OMP_NUM_THREADS": str(len(cores)), CORES_ENV: ids}


def _id_list(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)
