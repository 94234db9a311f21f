"""Choosing the backend a server's config names; each backend's heavy imports stay lazy."""

from __future__ import annotations

from services.config.servers import TeacherServerConfig
from teacher_server.teacher_engine import EngineBase


def load_engine(config: TeacherServerConfig) -> EngineBase:
    """Build the engine the config names (imports the backend's heavy modules lazily)."""
    if config.backend == "hf":
        from teacher_server.hf_backend import HFTeacherEngine

        return HFTeacherEngine(config)
    from teacher_server.vllm_backend import VLLMTeacherEngine

    return VLLMTeacherEngine(config)
