"""Teacher pools: which teacher scores a group, and one `TeacherClient` per teacher.

A run's `teacher_urls` names one or more pools (services/config/teachers.py), each the
replicas of one teacher. `route` picks a group's pool: the most specific `tasks` entry
that matches it (`task/subset`, then `task`), else a share of the pools with a weight, by
a hash of the group id, so that a group scored again goes to the same pool. Each pool is
its own `TeacherClient`, with its own load balancing, breakers, health checks and
deadline; the scorer splits a batch by pool and scores the parts concurrently.

    async with TeacherPools.connect(run.teacher_urls, deadline_s=120.0) as pools:
        for pool, groups in pools.split(batch):
            response = await pool.client.score(...)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from services.clients.teacher import TeacherClient, TeacherRequestError, all_or_cancel
from services.common.http_server import API_KEY_ENV
from services.common.protocol import RolloutGroup, ServerInfo
from services.common.tokenizer_check import TokenizerMismatch, check_compatible
from services.config.teachers import DEFAULT_POOL, POOL_NAME_PATTERN, TeacherPoolConfig

log = logging.getLogger(__name__)


class NoTeacherPool(TeacherRequestError):
    """No pool takes this group (a task the run's pools do not route): scoring it again
    cannot help, so the scorer dead-letters it with this reason."""

    def __init__(self, group: RolloutGroup) -> None:
        super().__init__(
            422,
            f"no teacher pool takes task {_rules(group)[-1]!r}: route it in teacher_urls "
            "(a pool's tasks, or a pool with a weight)",
        )


@dataclass
class TeacherPool:
    config: TeacherPoolConfig
    client: Any  # a TeacherClient, or anything with its `score` and `reachable`

    @property
    def name(self) -> str:
        return self.config.name


class TeacherPools:
    def __init__(self, pools: list[TeacherPool]) -> None:
        if not pools:
            raise ValueError("TeacherPools needs at least one pool")
        self.pools = pools
        self._by_rule = {rule: pool for pool in pools for rule in pool.config.tasks}
        self._shared = [pool for pool in pools if pool.config.share > 0]
        self._total_share = sum(pool.config.share for pool in self._shared)
        self._stack = AsyncExitStack()

    @classmethod
    def connect(cls, configs: list[TeacherPoolConfig], **client_options: Any) -> TeacherPools:
        """A `TeacherClient` per pool, with the same options; start them with `async with`."""
        return cls([TeacherPool(c, TeacherClient(c.urls, **client_options)) for c in configs])

    @classmethod
    def of(cls, teacher: TeacherPools | Any) -> TeacherPools:
        """Pools as they are; a single client as the one pool `default`, taking every group."""
        if isinstance(teacher, TeacherPools):
            return teacher
        # The replicas' URLs live in the client; the config only routes (every group here).
        only = TeacherPoolConfig.model_construct(name=DEFAULT_POOL, urls=[], tasks=[], weight=None)
        return cls([TeacherPool(only, teacher)])

    async def __aenter__(self) -> TeacherPools:
        for pool in self.pools:
            await self._stack.enter_async_context(pool.client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def route(self, group: RolloutGroup) -> TeacherPool:
        """The pool that scores `group`; raises `NoTeacherPool` when none takes it."""
        for rule in _rules(group):
            if rule in self._by_rule:
                return self._by_rule[rule]
        if not self._shared:
            raise NoTeacherPool(group)
        point = _unit_hash(group.group_id) * self._total_share
        for pool in self._shared:
            point -= pool.config.share
            if point < 0:
                return pool
        return self._shared[-1]  # rounding at the very top of the range

    def split(self, groups: list[RolloutGroup]) -> list[tuple[TeacherPool, list[RolloutGroup]]]:
        """`groups` by the pool that scores them, in pool order; before any teacher call, so
        that a group no pool takes is refused (`NoTeacherPool`) without scoring the others."""
        parts: dict[str, list[RolloutGroup]] = {}
        for group in groups:
            parts.setdefault(self.route(group).name, []).append(group)
        return [(pool, parts[pool.name]) for pool in self.pools if pool.name in parts]

    async def each(
        self,
        groups: list[RolloutGroup],
        score: Callable[[TeacherPool, list[RolloutGroup]], Awaitable[None]],
    ) -> None:
        """`score(pool, part)` for every pool's part, concurrently; the first failure
        cancels the others."""
        await all_or_cancel(score(pool, part) for pool, part in self.split(groups))

    async def infos(self) -> dict[str, ServerInfo]:
        """Each pool's `/v1/info` (from any healthy replica), by pool name."""
        answers = await all_or_cancel(pool.client.info() for pool in self.pools)
        return {pool.name: info for pool, info in zip(self.pools, answers, strict=True)}

    def reachable(self) -> bool:
        """Every pool may answer now (see `TeacherClient.reachable`): a batch can need any."""
        return all(pool.client.reachable() for pool in self.pools)


async def verify_tokenizers(
    teacher: TeacherPools | TeacherClient, student_url: str, api_key: str | None = None
) -> dict[str, ServerInfo]:
    """The tokenizer check at start-up (docs/design.md#tokens-and-the-tokenizer-check):
    fetch the student's and every pool's `/v1/info` and refuse a tokenizer mismatch.

    Returns each pool's info by name; raises `TokenizerMismatch` naming the pool and both
    fingerprints.
    """
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers, timeout=30.0) as http:
        response = await http.get(student_url.rstrip("/") + "/v1/info")
        response.raise_for_status()
        student = ServerInfo.model_validate_json(response.content)
    infos = await TeacherPools.of(teacher).infos()
    for name, info in infos.items():
        check_pool_tokenizer(student, info, name)
    return infos


def check_pool_tokenizer(student: ServerInfo, teacher: ServerInfo, pool: str) -> None:
    """`check_compatible`, its refusal or its warning (what an OpenAI-compatible teacher
    publishes may not tell) naming the teacher pool."""
    try:
        cannot_tell = check_compatible(student, teacher)
    except TokenizerMismatch as exc:
        raise TokenizerMismatch(f"teacher pool {pool!r}: {exc}") from None
    if cannot_tell:
        log.warning("teacher pool %s: %s", pool, cannot_tell)


def _rules(group: RolloutGroup) -> list[str]:
    """The `tasks` entries that match `group`, most specific first."""
    if group.subset is None:
        return [group.task]
    return [f"{group.task}/{group.subset}", group.task]


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for `text`, the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def with_urls(pools: list[TeacherPoolConfig], given: list[str]) -> list[TeacherPoolConfig]:
    """The configured pools with URLs given on the command line or in TEACHER_URLS: plain
    URLs replace those of the one pool (`default` when none is configured); `NAME=URL`
    replaces those of pool NAME. Names and routes come only from the config. Raises
    `ValueError` saying what to write instead."""
    if not given:
        return pools
    named: dict[str, list[str]] = {}
    plain: list[str] = []
    for entry in given:
        name, sep, url = entry.partition("=")
        if sep and re.fullmatch(POOL_NAME_PATTERN, name) and "://" in url:
            named.setdefault(name, []).append(url)
        else:
            plain.append(entry)
    if plain and named:
        raise ValueError("give teacher URLs either all as NAME=URL or all as plain URLs")
    if plain:
        if len(pools) > 1:
            names = ", ".join(pool.name for pool in pools)
            raise ValueError(
                f"the run has teacher pools {names}: say which pool each URL serves, "
                f"as NAME=URL (e.g. {pools[0].name}={plain[0]})"
            )
        base = pools[0] if pools else TeacherPoolConfig(name=DEFAULT_POOL, urls=plain)
        return [base.model_copy(update={"urls": plain})]
    unknown = sorted(set(named) - {pool.name for pool in pools})
    if unknown:
        known = ", ".join(pool.name for pool in pools) or "none"
        raise ValueError(
            f"no teacher pool named {', '.join(unknown)} in the config (its pools: {known}): "
            "pools and their routes are set in teacher_urls"
        )
    return [pool.model_copy(update={"urls": named.get(pool.name, pool.urls)}) for pool in pools]
