"""`rlad scorer`: add teacher logprobs to rollout groups (stream `rollouts` → `scored`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from services.common.protocol import ServerInfo
    from services.config.run import RunConfig

log = logging.getLogger(__name__)


def check_teacher(student: ServerInfo, teacher: ServerInfo, run: RunConfig) -> None:
    """At start: refuse a teacher whose tokenizer differs from the student's; warn when it
    computes in a coarser dtype than the trainer trains in."""
    from services.common.precision import (
        gpu_here,
        resolve_training_dtype,
        teacher_precision_warning,
    )
    from services.common.tokenizer_check import check_compatible

    check_compatible(student, teacher)
    where = ""
    if run.trainer.dtype == "auto":
        where = (
            " (trainer.dtype auto, as it resolves on this machine; set trainer.dtype when the "
            "trainer runs on another)"
        )
    training = resolve_training_dtype(run.trainer.dtype, gpu_here())
    warning = teacher_precision_warning(teacher, training, where)
    if warning:
        log.warning(warning)


def command(
    config: Path = typer.Option(..., "--config", exists=True, help="Experiment YAML."),
    teacher_url: list[str] = typer.Option(
        [],
        "--teacher-url",
        help="Teacher server URL (repeatable; default: env TEACHER_URLS), or `registry`: "
        "follow the teachers registered in the run's Redis (`rlad serve-teacher --register`).",
    ),
    rollout_url: str | None = typer.Option(
        None, "--rollout-url", help="A rollout server, to check tokenizer compatibility."
    ),
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL"),
    consumer: str = typer.Option(
        f"scorer-{socket.gethostname()}-{os.getpid()}", help="Consumer name in the group."
    ),
) -> None:
    """Score groups with the teacher (or pass them through for plain GRPO)."""
    from services.cli.options import load_run, registry_given
    from services.clients.discovery import expand_teacher_urls
    from services.clients.rollout import RolloutClient
    from services.clients.teacher import TeacherClient
    from services.common.http_server import api_key
    from services.common.runtime import StopFlag, configure_logging
    from services.queue.connection import connect_async
    from services.queue.queues import AsyncQueue
    from services.queue.registry import AsyncServerRegistry, following
    from services.workers.scorer import Scorer, Stopped, until_stopped

    configure_logging("scorer")
    run = load_run(config)
    stop = StopFlag()
    passthrough = run.scorer.mode == "passthrough"
    env_urls = [u for u in os.environ.get("TEACHER_URLS", "").split(",") if u]
    given = teacher_url or env_urls or run.teacher_urls
    registry = registry_given(given, "--teacher-url")
    urls = [] if passthrough or registry else expand_teacher_urls(given)
    if not passthrough and not urls and not registry:
        raise typer.BadParameter(
            "no teacher: pass --teacher-url (or `registry`) or set TEACHER_URLS"
        )

    async def main() -> None:
        async with connect_async(redis_url) as redis_client:
            queue = await AsyncQueue.open(redis_client, run.name, run.queue)
            if passthrough:
                await Scorer(run.scorer, queue, None, consumer).run(stop)
                return
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(
                    TeacherClient(
                        urls,
                        api_key=api_key(),
                        deadline_s=run.scorer.deadline_s,
                        follows_registry=registry,
                    )
                )
                if registry:
                    servers = AsyncServerRegistry(redis_client, run.name, run.queue.redis_outage_s)
                    await stack.enter_async_context(following(servers, "teacher", client.set_urls))
                if rollout_url:
                    async with RolloutClient([rollout_url], api_key=api_key()) as rollout:
                        try:  # waits for a teacher until its deadline, or a stop
                            infos = await until_stopped(
                                asyncio.gather(rollout.info(), client.info()), stop
                            )
                        except Stopped:
                            return
                        check_teacher(*infos, run)
                await Scorer(run.scorer, queue, client, consumer).run(stop)

    asyncio.run(main())
