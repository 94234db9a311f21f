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
    from services.clients.teacher_pools import TeacherPools
    from services.common.protocol import ServerInfo
    from services.config.run import RunConfig
    from services.config.teachers import TeacherPoolConfig
    from services.queue.registry import AsyncServerRegistry

log = logging.getLogger(__name__)


def check_teacher(student: ServerInfo, teacher: ServerInfo, run: RunConfig, pool: str) -> None:
    """At start, for each teacher pool: refuse a teacher whose tokenizer differs from the
    student's; warn when it computes in a coarser dtype than the trainer trains in, or
    when what the teacher publishes cannot tell either (an OpenAI-compatible teacher)."""
    from services.clients.teacher_pools import check_pool_tokenizer
    from services.common.precision import (
        gpu_here,
        resolve_training_dtype,
        teacher_precision_warning,
    )

    check_pool_tokenizer(student, teacher, pool)
    where = ""
    if run.trainer.dtype == "auto":
        where = (
            " (trainer.dtype auto, as it resolves on this machine; set trainer.dtype when the "
            "trainer runs on another)"
        )
    training = resolve_training_dtype(run.trainer.dtype, gpu_here())
    warning = teacher_precision_warning(teacher, training, where)
    if warning:
        log.warning("teacher pool %s: %s", pool, warning)


def command(
    config: Path = typer.Option(..., "--config", exists=True, help="Experiment YAML."),
    teacher_url: list[str] = typer.Option(
        [],
        "--teacher-url",
        help="Teacher URL, or NAME=URL for teacher pool NAME (repeatable; default: env "
        "TEACHER_URLS, separated by commas; else the config's teacher_urls): http://host:8100 "
        "for rlad serve-teacher, openai+http://host:8000/v1 for vllm serve; or `registry`: "
        "follow the teachers registered in the run's Redis (`rlad serve-teacher --register`), "
        "each pool its own (`--pool`).",
    ),
    rollout_url: str | None = typer.Option(
        None,
        "--rollout-url",
        help="A rollout server, to check tokenizer compatibility; or `registry`: one "
        "registered in the run's Redis (`rlad serve-rollout --register`).",
    ),
    redis_url: str | None = typer.Option(None, "--redis-url", envvar="REDIS_URL"),
    consumer: str = typer.Option(
        f"scorer-{socket.gethostname()}-{os.getpid()}", help="Consumer name in the group."
    ),
) -> None:
    """Score groups with the teacher (or pass them through for plain GRPO)."""
    from services.cli.options import async_redis_client, load_run, registry_given
    from services.clients.discovery import expand_teacher_urls
    from services.clients.teacher_pools import TeacherPools
    from services.common.http_server import api_key
    from services.common.runtime import StopFlag, configure_logging
    from services.config.workers import parse_teacher_url
    from services.queue.queues import AsyncQueue
    from services.queue.registry import AsyncServerRegistry, following
    from services.workers.scorer import Scorer, Stopped, until_stopped

    configure_logging("scorer")
    run = load_run(config)
    stop = StopFlag()
    passthrough = run.scorer.mode == "passthrough"
    env_urls = [u for u in os.environ.get("TEACHER_URLS", "").split(",") if u]
    given = teacher_url or env_urls
    registry = not passthrough and registry_given(given, "--teacher-url")
    try:
        pools = [] if passthrough else _pools(run, [] if registry else given, registry)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--teacher-url / TEACHER_URLS") from None
    pools = [pool.model_copy(update={"urls": expand_teacher_urls(pool.urls)}) for pool in pools]
    if not passthrough and not pools:
        raise typer.BadParameter(
            "no teacher: pass --teacher-url (or `registry`) or set TEACHER_URLS"
        )
    for url in (url for pool in pools for url in pool.urls):
        try:
            parse_teacher_url(url)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--teacher-url") from exc

    async def main() -> None:
        async with async_redis_client(redis_url) as redis_client:
            queue = await AsyncQueue.open(redis_client, run.name, run.queue)
            if passthrough:
                await Scorer(run.scorer, queue, None, consumer).run(stop)
                return
            async with contextlib.AsyncExitStack() as stack:
                teachers = await stack.enter_async_context(
                    TeacherPools.connect(
                        pools,
                        api_key=api_key(),
                        deadline_s=run.scorer.deadline_s,
                        follows_registry=registry,
                    )
                )
                servers = AsyncServerRegistry(redis_client, run.name, run.queue.redis_outage_s)
                if registry:
                    for each in teachers.pools:
                        await stack.enter_async_context(
                            following(servers, "teacher", each.client.set_urls, pool=each.name)
                        )
                if rollout_url:
                    try:  # waits for the servers until their deadline, or a stop
                        await until_stopped(
                            check_teachers(run, rollout_url, servers, teachers), stop
                        )
                    except Stopped:
                        return
                await Scorer(run.scorer, queue, teachers, consumer).run(stop)

    asyncio.run(main())


async def check_teachers(
    run: RunConfig, rollout_url: str, servers: AsyncServerRegistry, teachers: TeacherPools
) -> None:
    """`check_teacher` for every pool, against the rollout server at `rollout_url`, or
    against one registered in the run's Redis when it says `registry`."""
    from services.cli.options import registry_given
    from services.clients.rollout import RolloutClient
    from services.common.http_server import api_key
    from services.queue.registry import following

    follows = registry_given([rollout_url], "--rollout-url")
    async with contextlib.AsyncExitStack() as stack:
        urls = [] if follows else [rollout_url]
        rollout = await stack.enter_async_context(
            RolloutClient(urls, api_key=api_key(), follows_registry=follows)
        )
        if follows:
            await stack.enter_async_context(following(servers, "rollout", rollout.set_urls))
        student, infos = await asyncio.gather(rollout.info(), teachers.infos())
    for pool, info in infos.items():
        check_teacher(student, info, run, pool)


def _pools(run: RunConfig, given: list[str], registry: bool) -> list[TeacherPoolConfig]:
    """The teacher pools to score with: the config's, with the URLs given (`with_urls`);
    following the registry, the same pools (or the one `default`) with no URL yet: each
    takes the servers registered under its name."""
    from services.clients.teacher_pools import with_urls
    from services.config.teachers import DEFAULT_POOL, TeacherPoolConfig

    if not registry:
        return with_urls(run.teacher_urls, given)
    pools = run.teacher_urls or [
        TeacherPoolConfig.model_construct(name=DEFAULT_POOL, urls=[], tasks=[])
    ]
    return [pool.model_copy(update={"urls": []}) for pool in pools]
