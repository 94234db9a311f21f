"""The safetensors format, streamed: write a state dict without a second copy in memory,
and read a file's header to check it before any tensor is loaded.

Layout: 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
data_offsets}}` padded to 8 bytes, then the raw tensor bytes back to back. The client
streams `encode_chunks(...)` straight into an HTTP body or a file; the server checks the
header (`read_header`) before it lets a reader touch the bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}
DTYPE_BYTES.update({"I8": 1, "U8": 1, "BOOL": 1})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class SafetensorsFormatError(ValueError):
    """Not a (complete) safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset into the data section
    end: int


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_chunks(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, Iterator[memoryview]]:
    """(total size in bytes, the file as chunks): header first, then each tensor's bytes.

    Tensors that share storage (tied embeddings) are written once per name, so the file
    carries every name of `state_dict` — vLLM needs `lm_head.weight` even when tied.
    """
    header: dict[str, object] = {}
    offset = 0
    names = sorted(state_dict)
    for name in names:
        tensor = state_dict[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise SafetensorsFormatError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded

    def chunks() -> Iterator[memoryview]:
        yield memoryview(prefix)
        for name in names:
            yield _tensor_bytes(state_dict[name])

    return len(prefix) + offset, chunks()


def parse_header(prefix: bytes) -> tuple[dict[str, TensorEntry], int] | None:
    """Header entries and the data start, or None when `prefix` is too short to tell yet."""
    if len(prefix) < 8:
        return None
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(f"header of {length} bytes: not a safetensors file")
    if len(prefix) < 8 + length:
        return None
    try:
        raw = json.loads(prefix[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    for name, spec in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(spec["dtype"]), tuple(int(d) for d in spec["shape"])
            start, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"header entry {name!r} is malformed") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype in DTYPE_BYTES and end - start != numel * DTYPE_BYTES[dtype]:
            raise SafetensorsFormatError(
                f"{name}: {end - start} bytes do not hold a {dtype} tensor of shape {shape}"
            )
        entries[name] = TensorEntry(dtype, shape, start, end)
    return entries, 8 + length


def data_size(entries: Mapping[str, TensorEntry]) -> int:
    return max((e.end for e in entries.values()), default=0)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Entries of a safetensors file, after checking the file holds all their bytes."""
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        parsed = parse_header(head + f.read(min(length, MAX_HEADER_BYTES + 1)))
    if parsed is None:
        raise SafetensorsFormatError(f"{path.name}: truncated inside the header")
    entries, data_start = parsed
    expected = data_start + data_size(entries)
    actual = path.stat().st_size
    if actual != expected:
        raise SafetensorsFormatError(
            f"{path.name}: {actual} bytes but its header describes {expected} "
            f"({'truncated' if actual < expected else 'trailing garbage'})"
        )
    return entries
