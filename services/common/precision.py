"""Whether the teacher's logprobs are as precise as the student's: the scorer's start-up
check (docs/design.md#the-teachers-precision).

TRRD's ratio and KDRL's KD term compare the trainer's logprob of each token with the
teacher's. A teacher that computes in bfloat16 while the trainer trains in fp32 adds noise
to that comparison that the student's side does not have (up to 0.45 nats measured, for
the tiny float32 teacher served by vLLM with `--dtype auto` on a CPU).
"""

from __future__ import annotations

from typing import Literal

from services.common.protocol import ServerInfo

# Significand bits: what decides how finely a logprob is resolved.
SIGNIFICAND_BITS = {"float32": 24, "float16": 11, "bfloat16": 8}
TRAINING_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def teacher_precision_warning(
    teacher: ServerInfo, training: Literal["fp32", "bf16"], where: str = ""
) -> str | None:
    """A warning when the teacher computes in a coarser dtype than the trainer trains in;
    None when it does not, or when the teacher does not say (a server of an older rlad).
    `where` says how `training` was found, for the message."""
    served = teacher.dtype
    trained = TRAINING_DTYPES[training]
    if served is None or SIGNIFICAND_BITS.get(served, 0) >= SIGNIFICAND_BITS[trained]:
        return None
    return (
        f"the teacher {teacher.model!r} computes in {served}, coarser than the trainer's "
        f"{training}{where}: its logprobs carry noise the student's do not, which TRRD's ratio "
        "and KDRL's KD term take for signal. Serve the teacher with --dtype float32 "
        "(teacher_server.dtype: float32), or train in bf16 (trainer.dtype: bf16)."
    )
