"""Fixtures of the rollout-server unit tests: a tiny tied-embedding student (the harder
case for weight updates) and freshly perturbed copies of it standing in for trained weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.tiny_models import TinyModelConfig, save_tiny_model


def perturbed_model(model_dir: Path, seed: int, scale: float = 0.05) -> PreTrainedModel:
    """The model of `model_dir` with every weight moved by seeded noise: a 'trained' step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="session")
def perturbed() -> Callable[..., PreTrainedModel]:
    return perturbed_model


@pytest.fixture(scope="session")
def tied_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TinyModelConfig(tie_word_embeddings=True, max_position_embeddings=256)
    return save_tiny_model(tmp_path_factory.mktemp("rollout") / "tied", config, seed=0)
