"""Compact binary encoding of the wire schemas: msgpack, numeric lists as raw arrays.

A list of ints travels as little-endian int32 bytes and a list of floats as float32 bytes
(msgpack ext types), so a 2,048-token logprob row is 8 KiB instead of ~20 KiB of JSON
and decodes with one `numpy.frombuffer`. Never pickle: a peer can only send data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

MSGPACK = "application/msgpack"
JSON = "application/json"

_INT32 = 1
_FLOAT32 = 2
_INT32_MAX = 2**31 - 1

M = TypeVar("M", bound=BaseModel)


class WireDecodeError(ValueError):
    """The body is not valid msgpack of the expected shape."""


def _pack_list(values: list[Any]) -> Any:
    ints = values and all(type(v) is int for v in values)
    if ints and min(values) >= -_INT32_MAX and max(values) <= _INT32_MAX:
        return msgpack.ExtType(_INT32, np.asarray(values, dtype="<i4").tobytes())
    if values and all(type(v) is float for v in values):
        return msgpack.ExtType(_FLOAT32, np.asarray(values, dtype="<f4").tobytes())
    return [_pack(v) for v in values]


def _pack(obj: Any) -> Any:
    if isinstance(obj, list):
        return _pack_list(obj)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    return obj


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _INT32:
        return np.frombuffer(data, dtype="<i4").tolist()
    if code == _FLOAT32:
        return np.frombuffer(data, dtype="<f4").tolist()
    raise WireDecodeError(f"unknown msgpack extension type {code}")


def encode(model: BaseModel) -> bytes:
    """Serialise a schema instance to the compact binary form."""
    return msgpack.packb(_pack(model.model_dump(mode="python")), use_bin_type=True)


def decode_raw(data: bytes) -> Any:
    """Bytes to plain Python data; raises `WireDecodeError` on anything malformed."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except WireDecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireDecodeError(f"body is not valid msgpack: {exc}") from exc


def decode(data: bytes, cls: type[M]) -> M:
    """Bytes to a validated schema instance (pydantic errors propagate as they are)."""
    return cls.model_validate(decode_raw(data))


def summarise_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """A pydantic error list on one line: where the first problem is, what it is, and how
    many more there are."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def describe_invalid(exc: Exception) -> str:
    """One line on why data is not a valid message, bounded (it is logged and stored)."""
    if isinstance(exc, ValidationError):
        return summarise_errors(exc.errors())[:300]
    return " ".join(str(exc).split())[:300] or type(exc).__name__
