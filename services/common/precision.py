"""Whether the teacher's logprobs are as precise as the student's: the scorer's start-up
check (docs/design.md#the-teachers-precision).

TRRD's ratio and KDRL's KD term compare the trainer's logprob of each token with the
teacher's. A teacher that computes in bfloat16 while the trainer trains in fp32 adds noise
to that comparison that the student's side does not have (up to 0.45 nats measured, for
the tiny float32 teacher served by vLLM with `--dtype auto` on a CPU).
"""

from __future__ import annotations

import os
from typing import Literal

from services.common.protocol import ServerInfo

# Significand bits: what decides how finely a logprob is resolved.
SIGNIFICAND_BITS = {"float32": 24, "float16": 11, "bfloat16": 8}
TRAINING_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def teacher_precision_warning(
    teacher: ServerInfo, training: Literal["fp32", "bf16"], where: str = ""
) -> str | None:
    """A warning when the teacher computes in a coarser dtype than the trainer trains in, or
    may (an OpenAI-compatible teacher, which does not say); None when it does not, or when
    a server of an older rlad does not say.
    `where` says how `training` was found, for the message."""
    served = teacher.dtype
    trained = TRAINING_DTYPES[training]
    if served is None and teacher.backend == "openai" and training == "fp32":
        return (
            f"the teacher {teacher.model!r} is an OpenAI-compatible server, which does not say "
            "what dtype it computes in: unless it was started with --dtype float32 (vllm serve "
            "downcasts a float32 checkpoint to bfloat16 under --dtype auto), its logprobs carry "
            f"noise the trainer's {training}{where} ones do not."
        )
    if served is None or SIGNIFICAND_BITS.get(served, 0) >= SIGNIFICAND_BITS[trained]:
        return None
    return (
        f"the teacher {teacher.model!r} computes in {served}, coarser than the trainer's "
        f"{training}{where}: its logprobs carry noise the student's do not, which TRRD's ratio "
        "and KDRL's KD term take for signal. Serve the teacher with --dtype float32 "
        "(teacher_server.dtype: float32), or train in bf16 (trainer.dtype: bf16)."
    )


def resolve_training_dtype(
    dtype: Literal["auto", "fp32", "bf16"], on_gpu: bool
) -> Literal["fp32", "bf16"]:
    """`trainer.dtype` with `auto` resolved as the trainer resolves it: bf16 on a GPU."""
    if dtype == "auto":
        return "bf16" if on_gpu else "fp32"
    return dtype


def gpu_here() -> bool:
    """Whether a trainer started on this machine would train on a GPU, judged without
    DeepSpeed (which the scorer's image does not have): CUDA is there and DeepSpeed is not
    told to use the CPU."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
