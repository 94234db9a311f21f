"""Fixtures of the rollout-server unit tests: a tiny tied-embedding student (the harder
case for weight updates), freshly perturbed copies of it standing in for trained weights,
and one transformers engine served on loopback the way `rlad serve-rollout` serves it
(tight limits, so that the slow-client and admission tests are quick)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from rollout_server.app import create_app
from rollout_server.backends import load_engine
from rollout_server.versioned import VersionedEngine
from services.bootstrap.tiny_models import TinyModelConfig, save_tiny_model
from services.config.servers import RolloutServerConfig
from tests.model_support import perturbed_model
from tests.server_support import ThreadedServer


@pytest.fixture(scope="session")
def perturbed() -> Callable[..., PreTrainedModel]:
    return perturbed_model


@pytest.fixture(scope="session")
def tied_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TinyModelConfig(tie_word_embeddings=True, max_position_embeddings=256)
    return save_tiny_model(tmp_path_factory.mktemp("rollout") / "tied", config, seed=0)


@pytest.fixture(scope="session")
def served_config(
    tied_student: Path, tmp_path_factory: pytest.TempPathFactory
) -> RolloutServerConfig:
    root = tmp_path_factory.mktemp("served")
    return RolloutServerConfig(
        model=str(tied_student), backend="hf", work_dir=root / "work",
        weights_dir=root / "weights", max_queue_tokens=4096, header_timeout_s=1.0,
        body_timeout_s=1.0, upload_idle_timeout_s=1.0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def served_engine(served_config: RolloutServerConfig) -> Iterator[VersionedEngine]:
    engine = load_engine(served_config)
    assert isinstance(engine, VersionedEngine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def rollout_url(
    served_config: RolloutServerConfig, served_engine: VersionedEngine
) -> Iterator[str]:
    """The served engine's URL; tests that push weights read the version and go above it."""
    app = create_app(served_config, served_engine)
    with ThreadedServer(app, served_config.header_timeout_s) as server:
        yield server.url
