"""Weights through CUDA IPC: a transformers rollout server reads the trainer's GPU memory.

The trainer owns one bucket buffer on its GPU for the whole run. At the handshake it sends
`share(buffer)`, the buffer's CUDA IPC handle as plain JSON data (nothing is pickled),
and the server maps it once with `open_shared`. Each update then packs one bucket of
tensors into the buffer (`pack`, offsets from `layout`) and sends only the slots; the
server copies every slot out (`unpack`) into its candidate model before it answers, so
the trainer may overwrite the buffer with the next bucket. Works between processes on
one host, on the same GPU (where NCCL refuses two ranks on one device) or on two.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from math import prod
from typing import Any

import torch
from pydantic import BaseModel

ALIGN = 256  # bytes: every slot starts aligned for any dtype and for fast copies
# A pattern the trainer writes before the handshake and the server reads back through the
# mapping: proof that IPC works between the two processes before any weight moves.
CHECK_BYTES = 64


class Slot(BaseModel):
    """Where one tensor lies in the bucket buffer."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: list[int]
    offset: int  # bytes from the start of the buffer

    def nbytes(self) -> int:
        return prod(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.name}: {self.dtype!r} is not a torch dtype")
        return dtype


def layout(tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> list[Slot]:
    """Consecutive aligned slots for (name, dtype, shape) triples."""
    slots: list[Slot] = []
    offset = 0
    for name, dtype, shape in tensors:
        dtype_name = str(dtype).removeprefix("torch.")
        slots.append(Slot(name=name, dtype=dtype_name, shape=list(shape), offset=offset))
        offset += -(-slots[-1].nbytes() // ALIGN) * ALIGN
    return slots


def buffer_bytes(slots: Sequence[Slot]) -> int:
    return max((s.offset + s.nbytes() for s in slots), default=0)


def view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The slot's tensor inside a uint8 `buffer` (no copy)."""
    end = slot.offset + slot.nbytes()
    if end > buffer.numel():
        raise ValueError(f"{slot.name}: bytes {slot.offset}..{end} lie beyond the buffer")
    return buffer[slot.offset : end].view(slot.torch_dtype).view(slot.shape)


def pack(buffer: torch.Tensor, slots: Sequence[Slot], tensors: Sequence[torch.Tensor]) -> None:
    for slot, tensor in zip(slots, tensors, strict=True):
        view(buffer, slot).copy_(tensor)


def unpack(buffer: torch.Tensor, slots: Sequence[Slot]) -> Iterable[tuple[str, torch.Tensor]]:
    return ((slot.name, view(buffer, slot)) for slot in slots)


def check_pattern() -> list[int]:
    return [(7 * i + 3) % 251 for i in range(CHECK_BYTES)]


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _raw(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def share(buffer: torch.Tensor) -> dict[str, Any]:
    """The CUDA IPC handle of a contiguous uint8 CUDA `buffer`, as JSON data."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buffer.device.type != "cuda" or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("share() takes a 1-D uint8 CUDA tensor")
    _, args = reduce_tensor(buffer)
    (_, size, stride, offset, _, _, _, handle, storage_bytes, storage_offset) = args[:10]
    _, ref_handle, ref_offset, event_handle, event_sync = args[10:]
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": offset,
        "handle": _b64(handle),
        "storage_bytes": storage_bytes,
        "storage_offset": storage_offset,
        "ref_counter_handle": _b64(ref_handle),
        "ref_counter_offset": ref_offset,
        "event_handle": _b64(event_handle),
        "event_sync_required": event_sync,
    }


def open_shared(shared: dict[str, Any], device: int) -> torch.Tensor:
    """The server's side of `share`: the trainer's buffer, mapped into this process on its
    own GPU `device` (the same GPU as the trainer's, or a peer of it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
        torch.Tensor,
        torch.Size(shared["size"]),
        tuple(shared["stride"]),
        int(shared["offset"]),
        torch.UntypedStorage,
        torch.uint8,
        device,
        _raw(shared["handle"]),
        int(shared["storage_bytes"]),
        int(shared["storage_offset"]),
        False,
        _raw(shared["ref_counter_handle"]),
        int(shared["ref_counter_offset"]),
        _raw(shared["event_handle"]),
        bool(shared["event_sync_required"]),
    )
