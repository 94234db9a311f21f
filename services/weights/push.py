"""The sender's half of a weight push: the bytes, the checksum and the headers.

A push is one safetensors file. Over HTTP its bytes stream in the body of
`POST /v1/weights/upload` with the headers `upload_headers` builds; over a shared volume
`write_weights_file` puts it at `<folder>/UPLOAD_FILE` and the request names it. The
rollout client (`services.clients.rollout`) sends either; the server's half is
`rollout_server.staging`.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import torch

from services.common.protocol import WeightProbe
from services.weights.safetensors_io import encode_chunks

UPLOAD_FILE = "model.safetensors"
SEND_CHUNK = 1024 * 1024


def sha256_of(chunks: Iterable[memoryview]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def upload_headers(
    state_dict: Mapping[str, torch.Tensor], version: int, probe: WeightProbe | None
) -> dict[str, str]:
    """Headers of `POST /v1/weights/upload`; hashes the encoded tensors once."""
    size, chunks = encode_chunks(state_dict)
    headers = {
        "content-type": "application/octet-stream",
        "content-length": str(size),
        "x-rlad-policy-version": str(version),
        "x-rlad-sha256": sha256_of(chunks),
    }
    if probe is not None:
        headers["x-rlad-probe"] = probe.model_dump_json()
    return headers


async def upload_body(state_dict: Mapping[str, torch.Tensor]) -> AsyncIterator[bytes]:
    for chunk in encode_chunks(state_dict)[1]:
        # Slices of 1 MiB, without a copy: the HTTP stack handles one huge buffer about
        # five times slower than many small ones.
        for start in range(0, len(chunk), SEND_CHUNK):
            yield chunk[start : start + SEND_CHUNK]  # type: ignore[misc]


def write_weights_file(path: Path, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Write the safetensors file and return its sha256, in one pass over the tensors."""
    digest = hashlib.sha256()
    partial = path.with_suffix(".partial")
    with partial.open("wb") as f:
        for chunk in encode_chunks(state_dict)[1]:
            digest.update(chunk)
            f.write(chunk)
    partial.rename(path)  # readers never see a half-written file
    return digest.hexdigest()
