"""Choosing the backend a server's config names; each backend's heavy imports stay lazy."""

from __future__ import annotations

from rollout_server.rollout_engine import RolloutEngine
from services.config.servers import RolloutServerConfig


def load_engine(config: RolloutServerConfig) -> RolloutEngine:
    """The engine `config.backend` names, loaded and ready to sample."""
    if config.backend == "vllm":
        from rollout_server.vllm_backend import VLLMRolloutEngine

        return VLLMRolloutEngine(config)
    from rollout_server.hf_backend import HFRolloutEngine

    return HFRolloutEngine(config)
