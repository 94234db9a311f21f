"""Fixtures of the rollout-server unit tests: a tiny tied-embedding student (the harder
case for weight updates) and freshly perturbed copies of it standing in for trained weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from services.bootstrap.tiny_models import TinyModelConfig, save_tiny_model
from tests.model_support import perturbed_model


@pytest.fixture(scope="session")
def perturbed() -> Callable[..., PreTrainedModel]:
    return perturbed_model


@pytest.fixture(scope="session")
def tied_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TinyModelConfig(tie_word_embeddings=True, max_position_embeddings=256)
    return save_tiny_model(tmp_path_factory.mktemp("rollout") / "tied", config, seed=0)
