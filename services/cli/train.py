"""`rlad train`: the DeepSpeed trainer (alone, or under `torchrun -m services.cli.main train`)."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    config: Path = typer.Option(..., "--config", exists=True, help="Experiment YAML."),
    rollout_url: list[str] = typer.Option(
        [],
        "--rollout-url",
        envvar="ROLLOUT_URLS",
        help="Rollout servers to push weights to (repeatable), or `registry`: the rollout "
        "servers registered in the run's Redis, looked up at every push.",
    ),
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
) -> None:
    """Train the student on scored groups and push each new version to the rollout servers."""
    from services.cli.options import load_run, registry_given
    from services.common.http_server import api_key
    from services.common.runtime import StopFlag, configure_logging
    from services.queue.connection import connect
    from services.queue.queues import GroupQueue
    from services.queue.registry import ServerRegistry
    from trainer.train import Trainer

    configure_logging("trainer")
    run = load_run(config)
    stop = StopFlag()
    client = connect(redis_url)
    queue = GroupQueue(client, run.name, run.queue)
    registry = None
    if registry_given(rollout_url, "--rollout-url"):
        registry, rollout_url = ServerRegistry(client, run.name, run.queue.redis_outage_s), []
    trainer = Trainer(run, queue, rollout_url, api_key(), stop, registry)
    if resume:
        trainer.resume()
    trainer.train()
