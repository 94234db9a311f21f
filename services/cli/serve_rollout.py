"""`rlad serve-rollout`: the student's sampling server with versioned weight updates.

    rlad serve-rollout --model path/to/student --backend vllm --port 8200

Options left out fall back to `RLAD_ROLLOUT_*` environment variables, then to the
defaults of `RolloutServerConfig`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer


def command(
    model: str = typer.Option(..., help="Hugging Face model id or local folder."),
    backend: str = typer.Option(None, help="vllm or hf."),
    host: str = typer.Option(None, help="Interface to bind (default 127.0.0.1)."),
    port: int = typer.Option(None, help="TCP port (default 8200)."),
    dtype: str = typer.Option(None, help="float32 (default), bfloat16, float16 or auto."),
    max_model_len: int = typer.Option(None, help="Longest prompt + completion."),
    in_flight_policy: str = typer.Option(None, help="finish or abort, on a weight update."),
    update_timeout_s: float = typer.Option(None, help="Drain/load deadline of an update."),
    upload_idle_timeout_s: float = typer.Option(None, help="Stalled-upload deadline."),
    policy_version: int = typer.Option(None, help="Version of the weights loaded at start."),
    require_probe: bool = typer.Option(None, help="Refuse updates without a probe."),
    work_dir: Path = typer.Option(None, help="Staging folder for weight updates."),
    kv_cache_gib: float = typer.Option(None, help="vLLM: KV cache size in GiB."),
    gpu_memory_utilization: float = typer.Option(None, help="vLLM: share of GPU memory."),
    nccl_weight_transfer: bool = typer.Option(None, help="vLLM on GPUs: accept NCCL updates."),
    log_level: str = typer.Option(None, help="debug, info, warning or error."),
) -> None:
    """Serve `POST /v1/generate` and the weight-update endpoints for one student model."""
    given: dict[str, Any] = {k: v for k, v in locals().items() if v is not None}
    import uvicorn

    from rollout_server.app import create_app
    from rollout_server.config import RolloutServerConfig
    from services.common.runtime import configure_logging

    config = RolloutServerConfig(**given)
    configure_logging("rollout")
    logging.getLogger(__name__).info("config: %s", config.model_dump_json())
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level)
