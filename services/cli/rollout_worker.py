"""`rlad rollout-worker`: sample groups from the rollout server(s) into the `rollouts` stream."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import typer


def command(
    config: Path = typer.Option(..., "--config", exists=True, help="Experiment YAML."),
    rollout_url: list[str] = typer.Option(
        ...,
        "--rollout-url",
        envvar="ROLLOUT_URLS",
        help="Rollout server URL (repeatable), or `registry`: follow the rollout servers "
        "registered in the run's Redis (`rlad serve-rollout --register`).",
    ),
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL"),
    max_groups: int | None = typer.Option(None, help="Stop after this many groups."),
) -> None:
    """Feed prompts to the rollout servers and publish one scored-by-reward group per prompt."""
    from transformers import AutoTokenizer

    from services.cli.options import load_run, registry_given
    from services.clients.rollout import RolloutClient
    from services.common.http_server import api_key
    from services.common.runtime import StopFlag, configure_logging
    from services.queue.connection import connect_async
    from services.queue.queues import AsyncQueue
    from services.queue.registry import AsyncServerRegistry, following
    from services.tasks import load_task
    from services.workers.rollout_worker import RolloutWorker

    configure_logging("rollout-worker")
    run = load_run(config)
    stop = StopFlag()
    tokenizer = AutoTokenizer.from_pretrained(run.student)
    registry = registry_given(rollout_url, "--rollout-url")
    urls = [] if registry else rollout_url

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            redis_client = await stack.enter_async_context(connect_async(redis_url))
            client = await stack.enter_async_context(
                RolloutClient(urls, api_key=api_key(), follows_registry=registry)
            )
            if registry:
                servers = AsyncServerRegistry(redis_client, run.name, run.queue.redis_outage_s)
                await stack.enter_async_context(following(servers, "rollout", client.set_urls))
            queue = await AsyncQueue.open(redis_client, run.name, run.queue)
            # Synchronous mode: one trainer batch (B groups), then wait for the new weights.
            sync_batch = run.trainer.batch_prompts if run.rollout.synchronous else None
            worker = RolloutWorker(
                run.rollout, queue, client.generate, load_task(run.task), tokenizer, sync_batch
            )
            await worker.run(stop, max_groups)

    asyncio.run(main())
