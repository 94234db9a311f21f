"""The student's parameters in buckets of bounded size, gathered one bucket at a time.

At ZeRO-3 each rank holds a slice of every parameter. Weight pushes and exports gather
the full tensors of one bucket (a collective: every rank walks the same buckets in the
same order), use them, and release them before the next one, so no GPU ever holds a
second full copy of the model. At the other stages the parameters are whole already and
gathering costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    """One parameter: every name it has (tied weights have several) and its full shape."""

    names: tuple[str, ...]
    param: nn.Parameter
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.param.element_size()

    def value(self) -> torch.Tensor:
        """The full tensor; inside `iter_buckets` only (at ZeRO-3 it is gathered there)."""
        return self.param.detach()


def entries(module: nn.Module) -> list[Entry]:
    """Every parameter once, in `named_parameters` order, with all of its names."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params.setdefault(id(param), param)
    # ZeRO-3 keeps the full shape in `ds_shape`; the partitioned `shape` is empty.
    return [
        Entry(tuple(names[key]), param, tuple(getattr(param, "ds_shape", param.shape)))
        for key, param in params.items()
    ]


def plan(module: nn.Module, bucket_bytes: int) -> list[list[Entry]]:
    """Consecutive parameters grouped while their bytes fit `bucket_bytes`; a parameter
    larger than that is a bucket of its own."""
    buckets: list[list[Entry]] = []
    size = 0
    for entry in entries(module):
        if buckets and size + entry.nbytes <= bucket_bytes:
            buckets[-1].append(entry)
            size += entry.nbytes
        else:
            buckets.append([entry])
            size = entry.nbytes
    return buckets


@contextmanager
def _gathered(bucket: list[Entry], zero_stage: int) -> Iterator[None]:
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([e.param for e in bucket], modifier_rank=None):
            yield
    else:
        yield


def iter_buckets(buckets: list[list[Entry]], zero_stage: int) -> Iterator[list[Entry]]:
    """Each bucket with its parameters whole until the loop asks for the next one.
    Collective at ZeRO-3: every rank must walk every bucket."""
    for bucket in buckets:
        with _gathered(bucket, zero_stage):
            yield bucket
