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

from services.cli.options import server_command
from services.config.servers import RolloutServerConfig

command = server_command(
    RolloutServerConfig,
    role="rollout",
    serves="student",
    block=lambda run: run.rollout_server,
    app_module="rollout_server.app",
    summary="Serve `POST /v1/generate` and the weight-update endpoints for one student model.",
)
