"""`rlad rollout-worker`: sample groups from the rollout server(s) into the `rollouts` stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer


def command(
    config: Path = typer.Option(..., "--config", exists=True, help="Experiment YAML."),
    rollout_url: list[str] = typer.Option(
        ..., "--rollout-url", envvar="ROLLOUT_URLS", help="Rollout server URL (repeatable)."
    ),
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL"),
    max_groups: int | None = typer.Option(None, help="Stop after this many groups."),
) -> None:
    """Feed prompts to the rollout servers and publish one scored-by-reward group per prompt."""
    from transformers import AutoTokenizer

    from services.cli.options import async_redis_client, load_run
    from services.clients.rollout import RolloutClient
    from services.common.http_server import api_key
    from services.common.runtime import StopFlag, configure_logging
    from services.queue.queues import AsyncQueue
    from services.tasks import load_task
    from services.workers.rollout_worker import RolloutWorker

    configure_logging("rollout-worker")
    run = load_run(config)
    stop = StopFlag()
    tokenizer = AutoTokenizer.from_pretrained(run.student)

    async def main() -> None:
        async with (
            async_redis_client(redis_url) as redis_client,
            RolloutClient(rollout_url, api_key=api_key()) as client,
        ):
            queue = await AsyncQueue.open(redis_client, run.name, run.queue)
            # Synchronous mode: one trainer batch (B groups), then wait for the new weights.
            sync_batch = run.trainer.batch_prompts if run.rollout.synchronous else None
            worker = RolloutWorker(
                run.rollout, queue, client.generate, load_task(run.task), tokenizer, sync_batch
            )
            await worker.run(stop, max_groups)

    asyncio.run(main())
