"""The bucket layout of CUDA IPC pushes, on the CPU: slots are aligned and disjoint, and
what `pack` writes `unpack` reads back exactly, whatever the dtypes."""

from __future__ import annotations

import pytest
import torch

from services.weights.cuda_ipc import ALIGN, Slot, buffer_bytes, layout, pack, unpack


def test_slots_are_aligned_disjoint_and_round_trip_mixed_dtypes() -> None:
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7),
        "c": torch.randn(2, 2, dtype=torch.float16),
    }
    slots = layout((name, t.dtype, t.shape) for name, t in tensors.items())
    assert [s.offset % ALIGN for s in slots] == [0, 0, 0]
    ends = [s.offset + s.nbytes() for s in slots]
    assert all(end <= nxt.offset for end, nxt in zip(ends, slots[1:], strict=False))
    buffer = torch.zeros(buffer_bytes(slots), dtype=torch.uint8)
    pack(buffer, slots, list(tensors.values()))
    for name, value in unpack(buffer, slots):
        assert value.dtype == tensors[name].dtype
        assert torch.equal(value, tensors[name])


def test_a_slot_outside_the_buffer_or_of_no_dtype_is_refused() -> None:
    buffer = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="beyond the buffer"):
        list(unpack(buffer, [Slot(name="w", dtype="float32", shape=[32], offset=0)]))
    with pytest.raises(ValueError, match="not a torch dtype"):
        list(unpack(buffer, [Slot(name="w", dtype="Tensor", shape=[1], offset=0)]))
