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

from services.cli.options import server_command
from services.config.servers import TeacherServerConfig

command = server_command(
    TeacherServerConfig,
    role="teacher",
    serves="teacher",
    block=lambda run: run.teacher_server,
    app_module="teacher_server.app",
    summary="Serve the teacher's token logprobs for one model.",
)
