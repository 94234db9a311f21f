"""Which cores each process of `rlad up` uses on a machine without a GPU.

Left alone, vLLM's CPU build binds each engine's OpenMP threads to the first core it sees,
and each engine's worker keeps polling for work for a second after every request, while
the trainer's torch starts one thread per core on top: the trainer, the stage with the most
compute per step, got a fraction of a core. Here both engines share the first half of the
cores (the teacher only scores a batch between generations) and the trainer gets the
other half to itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_placement(cores: Sequence[int]) -> dict[str, dict[str, str]]:
    """Environment per process name ("rollout", "teacher", "trainer") for `cores`."""
    if not cores:
        raise ValueError("no cores to place the pipeline on")
    half = max(len(cores) // 2, 1)
    # vLLM binds its threads to the listed cores; a transformers engine (`backend: hf`) sizes
    # its thread pool from OMP_NUM_THREADS.
    engines = {"VLLM_CPU_OMP_THREADS_BIND": _id_list(cores[:half]), "OMP_NUM_THREADS": str(half)}
    trainer = list(cores[half:]) or list(cores)
    return {
        "rollout": engines,
        "teacher": dict(engines),
        "trainer": {"OMP_NUM_THREADS": str(len(trainer))},
    }


def placement_for_this_machine(enabled: bool) -> dict[str, dict[str, str]]:
    """The CPU placement when enabled and no GPU is visible; nothing to set otherwise."""
    if not enabled or torch.cuda.is_available():
        return {}
    return cpu_placement(available_cores())


def _id_list(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)
