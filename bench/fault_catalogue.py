"""The faults bench/faults.py injects, one at a time (`FAULTS`, by the names `--faults`
takes) and at random in the chaos run (`CHAOS_FAULTS`): each kills or stops one process, or
Redis, and restarts what it stopped."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from fault_supervisor import Death, Supervisor


@dataclass
class Settings:
    recover_s: float
    teacher_down_s: float


Inject = Callable[[Supervisor, Settings], list[Death]]


def kill_and_restart(name: str) -> Inject:
    def inject(supervisor: Supervisor, _: Settings) -> list[Death]:
        supervisor.kill(name)
        supervisor.restart(name)
        return []

    return inject


def teacher_down(supervisor: Supervisor, settings: Settings) -> list[Death]:
    supervisor.kill("teacher")
    deaths = supervisor.pause("teacher down", settings.teacher_down_s)
    supervisor.restart("teacher")
    return deaths


def redis_down_and_up(stop: Callable[[Supervisor], None]) -> Inject:
    """Stop Redis one way, and start it again on the same port and append-only file."""

    def inject(supervisor: Supervisor, _: Settings) -> list[Death]:
        down_at = time.monotonic()
        stop(supervisor)
        supervisor.restart("redis")
        print(f"  Redis back on its port after {time.monotonic() - down_at:.1f} s", flush=True)
        return []

    return inject


redis_shutdown_nosave = redis_down_and_up(Supervisor.stop_redis)
redis_kill = redis_down_and_up(lambda supervisor: supervisor.kill("redis"))


def redis_restart(supervisor: Supervisor, settings: Settings) -> list[Death]:
    """Either way of stopping Redis, at random (chaos)."""
    return random.choice([redis_shutdown_nosave, redis_kill])(supervisor, settings)


@dataclass
class Fault:
    name: str  # as given to --faults
    title: str
    inject: Inject


FAULTS = [
    Fault("scorer", "kill the scorer", kill_and_restart("scorer")),
    Fault("teacher", "teacher down", teacher_down),
    Fault("trainer", "kill the trainer (+ resume)", kill_and_restart("trainer")),
    Fault("rollout", "kill the rollout server", kill_and_restart("rollout")),
    Fault("worker", "kill the rollout worker", kill_and_restart("rollout-worker")),
    Fault("redis-shutdown", "Redis SHUTDOWN NOSAVE", redis_shutdown_nosave),
    Fault("redis-kill", "Redis kill -9", redis_kill),
]
QUICK_FAULTS = ("scorer", "trainer", "redis-kill")
CHAOS_FAULTS = [
    Fault("teacher", "kill the teacher", kill_and_restart("teacher")),
    Fault("scorer", "kill the scorer", kill_and_restart("scorer")),
    Fault("trainer", "kill the trainer (+ resume)", kill_and_restart("trainer")),
    Fault("rollout", "kill the rollout server", kill_and_restart("rollout")),
    Fault("redis", "restart Redis", redis_restart),
]
