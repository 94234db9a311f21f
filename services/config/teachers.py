"""The remote teachers of a run: `teacher_urls`, one or more pools of replicas.

A plain list of URLs is one pool (named `default`) of replicas of one teacher. A list of
pools names several teachers, each a list of replicas, and says which groups each scores:

    teacher_urls:
      - name: math
        urls: [http://10.0.0.5:8100]
        tasks: [math]                 # every group of task math
      - name: logic
        urls: [http://10.0.0.6:8100, http://10.0.0.7:8100]
        tasks: [kk/PPL7, kk/PPL8]     # only these subsets of task kk
      - name: small
        urls: [http://10.0.0.8:8100]
        weight: 1.0                   # a share of the groups no `tasks` rule takes

A `tasks` entry is a task name (`kk`) or a task and one of its subsets (`kk/PPL8`); the
most specific entry that matches a group wins. Groups no entry matches are shared among the
pools with a weight, in proportion to it (by a hash of the group id, so that a group sent
again goes to the same pool). Routing itself is `services/clients/teacher_pools.py`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from services.config.base import StrictModel
from services.config.workers import parse_teacher_url

DEFAULT_POOL = "default"  # the one pool of a plain list of URLs (or of a local teacher)
# Letters, digits, `.`, `_`, `-`: a pool name is part of a run counter and of NAME=URL.
POOL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TASK_RULE_PATTERN = r"^[A-Za-z0-9._-]+(/[^/\s]+)?$"


class TeacherPoolConfig(StrictModel):
    """One teacher: its replicas (balanced and failed over by one `TeacherClient`) and the
    groups it scores."""

    name: str = Field(
        pattern=POOL_NAME_PATTERN,
        description="Pool name, recorded on every group it scores (`teacher_pool`) and the key "
        "of its pinned revision (trainer.teacher_revision).",
    )
    urls: list[str] = Field(description="The replicas of this teacher, all serving one model.")
    tasks: list[str] = Field(
        default_factory=list,
        description="Groups routed here: a task name (`math`) or task/subset (`kk/PPL8`).",
    )
    weight: float | None = Field(
        default=None,
        ge=0.0,
        description="Share of the groups that no `tasks` entry routes, relative to the other "
        "pools' weights. Default: 1 for a pool without `tasks`, 0 for one with them.",
    )

    @field_validator("urls")
    @classmethod
    def _some_replica(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("a teacher pool needs at least one URL (one replica)")
        for url in urls:
            parse_teacher_url(url)  # raises naming the accepted forms
        return urls

    @field_validator("tasks")
    @classmethod
    def _task_rules(cls, tasks: list[str]) -> list[str]:
        bad = [task for task in tasks if not re.fullmatch(TASK_RULE_PATTERN, task)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a task name (`kk`) nor task/subset (`kk/PPL8`)")
        return tasks

    @model_validator(mode="after")
    def _takes_some_groups(self) -> TeacherPoolConfig:
        if not self.tasks and self.weight == 0:
            raise ValueError(
                f"teacher pool {self.name!r} takes no groups: give it `tasks` or a weight above 0"
            )
        return self

    @property
    def share(self) -> float:
        """Its weight among the pools that share the groups no `tasks` entry routes."""
        if self.weight is not None:
            return self.weight
        return 0.0 if self.tasks else 1.0


def as_pools(value: Any) -> Any:
    """A plain list of URLs as the one pool `default`; a list of pools as it is. A list
    mixing both is refused, since URLs outside a pool would have no name and no route."""
    if not isinstance(value, list) or not value:
        return value
    plain = [isinstance(entry, str) for entry in value]
    if all(plain):
        return [{"name": DEFAULT_POOL, "urls": value}]
    if any(plain):
        raise ValueError(
            "teacher_urls is either a list of URLs (one teacher) or a list of pools "
            "(each with name and urls), not both: put the URLs in a pool's urls"
        )
    return value


def check_pools(pools: list[TeacherPoolConfig], task: str) -> None:
    """Names unique, no task rule in two pools, and a pool for every group of `task` (the
    run's task). Raises `ValueError` saying what to change."""
    names = [pool.name for pool in pools]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ValueError(f"teacher pool name {twice!r} is used twice: name each pool once")
    routed: dict[str, str] = {}
    for pool in pools:
        for rule in pool.tasks:
            if rule in routed:
                raise ValueError(
                    f"task {rule!r} is routed to teacher pools {routed[rule]!r} and "
                    f"{pool.name!r}: route each task to one pool"
                )
            routed[rule] = pool.name
    if not any(pool.share > 0 for pool in pools) and task not in routed:
        raise ValueError(
            f"no teacher pool takes every group of task {task!r} (pools {', '.join(names)} "
            f"route only some tasks): add {task!r} to a pool's tasks, or give a pool a weight"
        )


def pinned_revisions(
    revision: str | dict[str, str] | None, pools: list[TeacherPoolConfig]
) -> dict[str, str]:
    """trainer.teacher_revision as a revision per pool name. One revision (a string) pins
    the one pool; with several pools each must be named, since they serve other models."""
    if revision is None:
        return {}
    names = [pool.name for pool in pools] or [DEFAULT_POOL]
    if isinstance(revision, str):
        if len(names) > 1:
            raise ValueError(
                f"trainer.teacher_revision is one revision, but the run has teacher pools "
                f"{', '.join(names)}: give a revision per pool ({names[0]}: <revision>, ...)"
            )
        return {names[0]: revision}
    unknown = sorted(set(revision) - set(names))
    if unknown:
        raise ValueError(
            f"trainer.teacher_revision names {', '.join(unknown)}, which is no teacher pool "
            f"of this run (pools: {', '.join(names)})"
        )
    return dict(revision)
