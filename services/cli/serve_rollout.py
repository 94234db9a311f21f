"""`rlad serve-rollout`: the student's sampling server with versioned weight updates.

    rlad serve-rollout --model path/to/student --backend vllm --port 8200
    rlad serve-rollout --config run.yaml --port 8200    # the run's rollout_server block
    rlad serve-rollout --config run.yaml --host 0.0.0.0 --register redis://redis-host:6379
        # ... announced in the run's registry (services/queue/registry.py)

One option per field of `RolloutServerConfig`. Options left out come from the run
config's `rollout_server` block (with `--config`), then from `RLAD_ROLLOUT_*` environment
variables, then from the defaults.
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
from services.config.servers import RolloutServerConfig


@model_options(RolloutServerConfig)
def command(
    config: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="Run YAML: serve its rollout_server block (the model is its student).",
    ),
    register: str | None = REGISTER,
    run: str | None = REGISTER_RUN,
    advertise_url: str | None = ADVERTISE_URL,
    pool: str = POOL,
    *,
    settings: dict[str, Any],
) -> None:
    """Serve `POST /v1/generate` and the weight-update endpoints for one student model."""
    from rollout_server.app import create_app
    from services.common.http_transport import serve
    from services.common.runtime import configure_logging

    block = None
    if config is not None:
        loaded = load_run(config)
        block, run = loaded.rollout_server, run or loaded.name
    server = build_model(RolloutServerConfig, settings, block)
    announcer = registration(register, run, advertise_url, pool, server)
    configure_logging("rollout")
    logging.getLogger(__name__).info("config: %s", server.model_dump_json())
    serve(create_app(server), server, announcer)
