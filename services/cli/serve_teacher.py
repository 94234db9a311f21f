"""`rlad serve-teacher`: the teacher's scoring server (`POST /v1/score`).

    rlad serve-teacher --model path/to/teacher --backend vllm --port 8100

Options left out fall back to `RLAD_TEACHER_*` environment variables, then to the
defaults of `TeacherServerConfig` (each documented there).
"""

from __future__ import annotations

import logging
from typing import Any

import typer


def command(
    model: str = typer.Option(..., help="Hugging Face model id or local folder."),
    backend: str = typer.Option(None, help="vllm (default) or hf."),
    host: str = typer.Option(None, help="Interface to bind (default 127.0.0.1)."),
    port: int = typer.Option(None, help="TCP port (default 8100)."),
    dtype: str = typer.Option(None, help="auto (default), float32, bfloat16 or float16."),
    device: str = typer.Option(None, help="hf backend: torch device (default: cuda if any)."),
    max_model_len: int = typer.Option(None, help="Longest sequence accepted."),
    max_batch_tokens: int = typer.Option(None, help="Token budget of one engine call."),
    max_wait_ms: float = typer.Option(None, help="Batching window of the first request."),
    dynamic_batching: bool = typer.Option(None, help="Coalesce concurrent requests."),
    max_queue_tokens: int = typer.Option(None, help="Admission bound (429 past it)."),
    max_request_tokens: int = typer.Option(None, help="Most tokens in one request."),
    max_body_bytes: int = typer.Option(None, help="Largest request body."),
    cache_bytes: int = typer.Option(None, help="Logprob cache budget in bytes (0: off)."),
    inject_latency_ms: float = typer.Option(None, help="Extra delay per /v1/score (benchmarks)."),
    gpu_memory_utilization: float = typer.Option(None, help="vLLM: share of GPU memory."),
    enforce_eager: bool = typer.Option(None, help="vLLM: skip graph compilation."),
    tensor_parallel_size: int = typer.Option(None, help="vLLM: GPUs per model."),
    log_level: str = typer.Option(None, help="debug, info, warning or error."),
) -> None:
    """Serve the teacher's token logprobs for one model."""
    given: dict[str, Any] = {k: v for k, v in locals().items() if v is not None}
    import uvicorn

    from services.common.runtime import configure_logging
    from teacher_server.app import create_app
    from teacher_server.config import TeacherServerConfig

    config = TeacherServerConfig(**given)
    configure_logging("teacher")
    logging.getLogger(__name__).info("config: %s", config.model_dump_json())
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level)
