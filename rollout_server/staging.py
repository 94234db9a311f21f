"""Receiving, checking and staging a weight update on the rollout server.

An update is staged in a folder of its own before the engine sees it: the HTTP body is
streamed to disk while its sha256 is computed (its safetensors header is checked against
the model's schema, and its size against the model's, before any tensor byte is
written); a shared-volume file is hard-linked (or copied), and only from inside the
server's `weights_dir`. Then every header is checked against the model's schema (names,
shapes, float dtypes), the checksums are compared, every value must be finite, and tied
models get `lm_head.weight` written next to the rest (vLLM's CPU build keeps the old head
otherwise; see docs/platform-notes.md#weight-reload-and-tied-embeddings). Only a folder
that passed all of that is handed to the engine. Any failure is an `ApiError` that names
the problem; the serving weights were never touched.

After loading, the engine checks the sender's probe (`services.weights.probe`), or
without one, that its own probe sequence scores to finite logprobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.common.http_server import ApiError
from services.weights.push import UPLOAD_FILE
from services.weights.safetensors_io import (
    SafetensorsFormatError,
    TensorEntry,
    data_size,
    parse_header,
    read_header,
)

FLOAT_DTYPES = {"F32", "BF16", "F16"}
TIED_FILE = "tied-head.safetensors"
WRITE_CHUNK = 8 * 1024 * 1024
# Room a safetensors header takes per tensor beyond its name (dtype, shape, offsets), and
# for optional metadata: what bounds the header of an update to this model.
HEADER_BYTES_PER_TENSOR = 128
HEADER_SLACK_BYTES = 64 * 1024
FINITE_CHECK_ELEMENTS = 1 << 24  # values checked per step: bounds the check's memory


@dataclass(frozen=True)
class WeightSchema:
    """Names and shapes the model's state dict has; tied pairs as {output: input} names."""

    shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> WeightSchema:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # shapes only: no memory, no init
            model = AutoModelForCausalLM.from_config(config)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        tied: dict[str, str] = {}
        if getattr(config.get_text_config(), "tie_word_embeddings", False):
            modules = {id(m): name for name, m in model.named_modules()}
            out_name = modules[id(model.get_output_embeddings())] + ".weight"
            in_name = modules[id(model.get_input_embeddings())] + ".weight"
            tied[out_name] = in_name
        return cls(shapes, tied)

    @property
    def max_header_bytes(self) -> int:
        """The longest safetensors header an update to this model can have."""
        names = sum(len(name) + HEADER_BYTES_PER_TENSOR for name in self.shapes)
        return 8 + names + HEADER_SLACK_BYTES

    @property
    def max_file_bytes(self) -> int:
        """The largest update of this model: every tensor in float32, plus its header."""
        return 4 * sum(math.prod(shape) for shape in self.shapes.values()) + self.max_header_bytes

    def problems(self, entries: dict[str, TensorEntry]) -> list[str]:
        found = []
        for name, entry in sorted(entries.items()):
            if name not in self.shapes:
                found.append(f"unexpected tensor {name!r}")
            elif entry.shape != self.shapes[name]:
                found.append(
                    f"{name}: shape {list(entry.shape)}, expected {list(self.shapes[name])}"
                )
            if entry.dtype not in FLOAT_DTYPES:
                found.append(f"{name}: dtype {entry.dtype}, expected one of {sorted(FLOAT_DTYPES)}")
        missing = sorted(set(self.shapes) - set(entries) - set(self.tied))
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            found.append(f"missing tensors {missing[:5]}{more}")
        return found


@dataclass(frozen=True)
class StagedWeights:
    """A checked update in its own folder, ready to load: only its files are read."""

    folder: Path
    sha256: dict[str, str]  # file name -> hex digest of the bytes received
    bytes: int

    @property
    def revision(self) -> str:
        lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(self.sha256.items()))
        return hashlib.sha256(lines.encode()).hexdigest()[:16]

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors"))


def _write_and_hash(path: Path, data: bytes, digest: hashlib._Hash) -> None:
    with path.open("ab") as f:
        f.write(data)
    digest.update(data)  # hashlib releases the GIL here, so this overlaps the network


def _check_upload_header(
    head: bytes, schema: WeightSchema, max_bytes: int
) -> tuple[dict[str, TensorEntry], int] | None:
    """The upload's header once `head` holds it all, checked against the model: names,
    shapes and dtypes (422) and the size it declares (413). None until it is complete."""
    try:
        header = parse_header(head)
    except SafetensorsFormatError as exc:
        raise ApiError(400, "malformed_weights", str(exc)) from None
    if header is None:
        if len(head) > schema.max_header_bytes:
            raise ApiError(
                400,
                "malformed_weights",
                f"no safetensors header within {schema.max_header_bytes} bytes, the longest "
                "this model's weights can have",
            )
        return None
    problems = schema.problems(header[0])
    if problems:
        raise ApiError(
            422, "weights_mismatch", "weights do not fit the model: " + "; ".join(problems)
        )
    declared = header[1] + data_size(header[0])
    if declared > max_bytes:
        raise ApiError(
            413, "too_large", f"the upload declares {declared} bytes, over the limit {max_bytes}"
        )
    return header


async def receive_upload(
    chunks: AsyncIterator[bytes],
    folder: Path,
    schema: WeightSchema,
    *,
    max_bytes: int,
    idle_timeout_s: float,
) -> tuple[Path, str]:
    """Stream a safetensors body into `folder`; returns (file, sha256). 400/408/413/422 on
    bad input, and no tensor byte is written before the header passed `schema`."""
    path = folder / UPLOAD_FILE
    digest = hashlib.sha256()
    head = b""
    header: tuple[dict[str, TensorEntry], int] | None = None
    pending: list[bytes] = []
    pending_bytes = received = 0
    loop = asyncio.get_running_loop()
    try:
        # One idle deadline, pushed back on every chunk (no task per chunk).
        async with asyncio.timeout(idle_timeout_s) as deadline:
            async for chunk in chunks:
                deadline.reschedule(loop.time() + idle_timeout_s)
                received += len(chunk)
                if received > max_bytes:
                    raise ApiError(
                        413, "too_large", f"upload exceeds the limit of {max_bytes} bytes"
                    )
                if header is None:
                    head += chunk
                    header = _check_upload_header(head, schema, max_bytes)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= WRITE_CHUNK:
                    await asyncio.to_thread(_write_and_hash, path, b"".join(pending), digest)
                    pending, pending_bytes = [], 0
    except TimeoutError:
        raise ApiError(
            408, "upload_timeout", f"no bytes for {idle_timeout_s:.0f}s after {received} bytes"
        ) from None
    await asyncio.to_thread(_write_and_hash, path, b"".join(pending), digest)
    if header is None:
        raise ApiError(400, "malformed_weights", f"upload truncated: {received} bytes, no header")
    expected = header[1] + data_size(header[0])
    if received != expected:
        raise ApiError(
            400,
            "truncated_upload" if received < expected else "malformed_weights",
            f"received {received} bytes but the safetensors header describes {expected}",
        )
    return path, digest.hexdigest()


def _inside(path: Path, root: Path, given: str) -> Path:
    """`path` with every symlink resolved; 403 unless that lies inside `root` (resolved).

    Checked before anything else is looked at, and the answer names only what the client
    sent: nothing tells whether a path outside exists, let alone its size or content.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(
            403,
            "outside_weights_dir",
            f"{given!r} is not inside the weights folder {root}: this server reads weight "
            "files only there (weights_dir)",
        )
    return resolved


def link_or_copy(given: str, weights_dir: Path | None, folder: Path) -> list[Path]:
    """Put the update's safetensors files into `folder` (hard links when the volume
    allows): `given` names a file or folder that must lie inside `weights_dir`."""
    if weights_dir is None:
        raise ApiError(
            403,
            "file_updates_off",
            "this server reads no weight files (weights_dir is not set): push over HTTP, or "
            "start it with --weights-dir naming the folder the sender writes to",
        )
    root = weights_dir.resolve()
    source = _inside(Path(given), root, given)  # relative: from the working directory
    if source.is_dir():
        sources = [_inside(p, root, f"{given}/{p.name}") for p in source.glob("*.safetensors")]
    elif source.is_file():
        sources = [source]
    else:
        raise ApiError(422, "weights_not_found", f"{given} is neither a file nor a folder")
    if not sources:
        raise ApiError(422, "weights_not_found", f"no *.safetensors files in {given}")
    staged = []
    for src in sorted(sources):
        dest = folder / src.name
        try:
            os.link(src, dest)  # a later rewrite by the sender must not change what we serve
        except OSError:
            shutil.copyfile(src, dest, follow_symlinks=False)
        # Neither call follows a symlink swapped in since the check: one is refused here.
        if not stat.S_ISREG(dest.lstat().st_mode):
            raise ApiError(403, "outside_weights_dir", f"{given}: {src.name} is not a file")
        staged.append(dest)
    return staged


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(WRITE_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_staged(
    folder: Path,
    schema: WeightSchema,
    received_sha: dict[str, str],
    declared_sha: dict[str, str] | None,
) -> StagedWeights:
    """Check headers against the schema, checksums against the sender's, that every value
    is finite; tie the head."""
    entries: dict[str, TensorEntry] = {}
    where: dict[str, Path] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            file_entries = read_header(path)
        except SafetensorsFormatError as exc:
            raise ApiError(400, "malformed_weights", str(exc)) from None
        for name in file_entries:
            if name in entries:
                problems.append(f"{name} appears in both {where[name].name} and {path.name}")
            where[name] = path
        entries.update(file_entries)
    if declared_sha is not None:
        if set(declared_sha) != set(received_sha):
            raise ApiError(
                400,
                "checksum_mismatch",
                f"sha256 given for files {sorted(declared_sha)}, received {sorted(received_sha)}",
            )
        for name, digest in sorted(received_sha.items()):
            if declared_sha.get(name, "").lower() != digest:
                raise ApiError(
                    400,
                    "checksum_mismatch",
                    f"{name}: sha256 of the received bytes is {digest}, the sender declared "
                    f"{declared_sha.get(name)!r}; the bytes were corrupted or truncated in transit",
                )
    problems += schema.problems(entries)
    if problems:
        raise ApiError(
            422, "weights_mismatch", "weights do not fit the model: " + "; ".join(problems)
        )
    not_finite = _non_finite(sorted(set(where.values())))
    if not_finite:
        raise ApiError(
            422, "weights_not_finite", "weights hold NaN or infinity: " + "; ".join(not_finite)
        )
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    for out_name, in_name in schema.tied.items():
        tie_check = _tie_head(folder, out_name, in_name, where)
        if tie_check:
            raise ApiError(422, "weights_mismatch", tie_check)
    return StagedWeights(folder, dict(received_sha), total)


def _non_finite(files: list[Path]) -> list[str]:
    """Per tensor holding NaN or infinity, how many such values: such weights load and
    then make every sampled token fail, so no update may carry them."""
    found = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                flat = f.get_tensor(name).reshape(-1)
                parts = flat.split(FINITE_CHECK_ELEMENTS)
                bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
                if bad:
                    found.append(f"{name} has {bad} of {flat.numel()}")
    return found


def _load_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _tie_head(folder: Path, out_name: str, in_name: str, where: dict[str, Path]) -> str | None:
    """Write the output head of a tied model when absent; refuse one that differs."""
    embedding = _load_tensor(where[in_name], in_name)
    if out_name not in where:
        save_file({out_name: embedding.contiguous()}, str(folder / TIED_FILE))
        return None
    if not torch.equal(_load_tensor(where[out_name], out_name), embedding):
        return f"tied model: {out_name} must equal {in_name} (the model shares them)"
    return None
