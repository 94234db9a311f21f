"""`rlad serve-teacher`: the teacher's scoring server (`POST /v1/score`).

    rlad serve-teacher --model path/to/teacher --backend vllm --port 8100
    rlad serve-teacher --config run.yaml --port 8100    # the run's teacher_server block
    rlad serve-teacher --config run.yaml --host 0.0.0.0 --register redis://redis-host:6379
        # ... announced in the run's registry (services/queue/registry.py)

One option per field of `TeacherServerConfig` (each documented there). Options left out
come from the run config's `teacher_server` block (with `--config`), then from
`RLAD_TEACHER_*` environment variables, then from the defaults.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from services.cli.options import (
    ADVERTISE_URL,
    POOL,
    REGISTER,
    REGISTER_RUN,
    build_model,
    load_run,
    model_options,
    registration,
)
from services.config.servers import TeacherServerConfig


@model_options(TeacherServerConfig)
def command(
    config: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="Run YAML: serve its teacher_server block (the model is its teacher).",
    ),
    register: str | None = REGISTER,
    run: str | None = REGISTER_RUN,
    advertise_url: str | None = ADVERTISE_URL,
    pool: str = POOL,
    *,
    settings: dict[str, Any],
) -> None:
    """Serve the teacher's token logprobs for one model."""
    from services.common.http_transport import serve
    from services.common.runtime import configure_logging
    from teacher_server.app import create_app

    block = None
    if config is not None:
        loaded = load_run(config)
        block, run = loaded.teacher_server, run or loaded.name
        if block is None:
            raise typer.BadParameter(f"{config} names no `teacher`", param_hint="--config")
    server = build_model(TeacherServerConfig, settings, block)
    announcer = registration(register, run, advertise_url, pool, server)
    configure_logging("teacher")
    logging.getLogger(__name__).info("config: %s", server.model_dump_json())
    serve(create_app(server), server, announcer)
