"""What a teacher server publishes about its model in `GET /v1/info`, read from the files.

Both backends call `describe_model` so that the same checkpoint reports the same
revision, vocabulary size and tokenizer fingerprint whichever engine serves it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoTokenizer

from services.common.protocol import ServerInfo
from services.common.tokenizer_check import tokenizer_fingerprint, tokenizer_probe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Up to this many bytes of weights the revision is the sha256 of every byte; past it (a
# 32B teacher is ~64 GB) it hashes each file's size and header plus evenly spaced samples,
# which still changes on any retraining while costing seconds instead of minutes.
FULL_HASH_MAX_BYTES = 4 * 1024**3
SAMPLES_PER_FILE = 64
SAMPLE_BYTES = 1024 * 1024
READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    revision: str
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_probe: str
    max_model_len: int

    def server_info(
        self,
        role: Literal["teacher", "rollout"],
        backend: Literal["vllm", "hf"],
        model: str,
        dtype: torch.dtype | str | None = None,
    ) -> ServerInfo:
        """`dtype`: what the engine computes in, as it reports it after loading (a torch
        dtype, or its name)."""
        return ServerInfo(
            role=role,
            model=model,
            revision=self.revision,
            backend=backend,
            vocab_size=self.vocab_size,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            tokenizer_probe=self.tokenizer_probe,
            max_model_len=self.max_model_len,
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        )


def resolve_model_dir(model: str) -> Path:
    """A local folder as it is; a Hugging Face id through the local hub cache/snapshot."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def _hash_file_fully(path: Path, digest: hashlib._Hash) -> None:
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)


def _hash_file_sampled(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    digest.update(str(size).encode())
    stride = max(size // SAMPLES_PER_FILE, 1)
    with path.open("rb") as f:
        for offset in range(0, size, stride):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))


def weights_revision(model_dir: Path) -> str:
    """A 16-hex-digit hash of the weight files (see FULL_HASH_MAX_BYTES)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model_dir}")
    total = sum(p.stat().st_size for p in files)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(model_dir)).encode())
        if total <= FULL_HASH_MAX_BYTES:
            _hash_file_fully(path, digest)
        else:
            _hash_file_sampled(path, digest)
    return digest.hexdigest()[:16]


def describe_model(model: str, max_model_len: int | None) -> ModelFacts:
    """Revision, vocab size, tokenizer fingerprint and probe, and the accepted length of
    `model`."""
    model_dir = resolve_model_dir(model)
    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    native_len = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    if max_model_len is None:
        if native_len < 2:
            raise ValueError(f"{model} does not declare max_position_embeddings: set max_model_len")
        max_model_len = native_len
    elif native_len and max_model_len > native_len:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings "
            f"({native_len})"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ModelFacts(
        path=model_dir,
        revision=weights_revision(model_dir),
        vocab_size=int(text_config.vocab_size),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_probe=tokenizer_probe(tokenizer),
        max_model_len=max_model_len,
    )
