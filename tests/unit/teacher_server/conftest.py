"""Fixtures of the teacher server unit tests: one fp32 HF engine on the tiny teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config.servers import TeacherServerConfig
from teacher_server.hf_backend import HFTeacherEngine
from tests.teacher_support import Reference


@pytest.fixture(scope="session")
def hf_config(tiny_teacher: Path) -> TeacherServerConfig:
    return TeacherServerConfig(
        model=str(tiny_teacher), backend="hf", dtype="float32", length_bucket=16,
        max_batch_tokens=1024, max_queue_tokens=8192, max_request_tokens=4096,
        max_model_len=256,
    )  # fmt: skip


@pytest.fixture(scope="session")
def hf_engine(hf_config: TeacherServerConfig) -> HFTeacherEngine:
    return HFTeacherEngine(hf_config)


@pytest.fixture(scope="session")
def reference(tiny_teacher: Path) -> Reference:
    return Reference(tiny_teacher)
