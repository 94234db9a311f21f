"""The supervisor of bench/faults.py: starts a `redis-server` with AOF and the stack of
`rlad up` on it, kills and restarts its processes, and notices those that die, as docker
compose's `restart: unless-stopped` would."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fault_accounts import Reading, TrainingAudit, json_lines, read_accounts

from services.config.run import RunConfig
from services.launch.processes import ManagedProcess, ProcessDied
from services.launch.redis_server import RedisServer
from services.launch.up import Pipeline, pipeline
from services.queue.connection import connect
from services.queue.queues import QueueReader

SERVERS = ("rollout", "teacher")  # restarted before the processes that call them
PROGRESS_EVERY_S = 10.0


@dataclass
class Death:
    name: str
    code: int | None
    why: str  # the last error its log shows


def last_error(process: ManagedProcess) -> str:
    lines = process.tail(80).splitlines()
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["(empty log)"])[-1].strip()


class Supervisor:
    """Starts, kills and restarts the stack's processes; notices those that die."""

    def __init__(self, running: Pipeline, redis_server: RedisServer, run: RunConfig) -> None:
        self.redis = redis_server
        self.processes = {"redis": redis_server.process}
        self.processes |= {p.name: p for p in running.stack.processes}
        # A restarted server counts as back once it answers, as compose's healthchecks say.
        self.health = {"rollout": f"{running.rollout_url}/health"}
        if "teacher" in self.processes:
            self.health["teacher"] = f"{running.teacher_urls[0]}/health"
        self.audit = TrainingAudit(run.folder)
        self.metrics = run.folder / "metrics.jsonl"
        client = connect(redis_server.url, socket_timeout=5.0)
        self.reader = QueueReader(client, run.name)
        self.down: set[str] = set()  # stopped on purpose, not restarted yet
        self.seen_dead: set[int] = set()  # pids already reported
        self.shown_at = 0.0

    def read(self) -> Reading:
        steps = [int(row["step"]) for row in json_lines(self.metrics)]
        last = steps[-1] if steps else None
        return Reading(time.monotonic(), len(steps), last, read_accounts(self.reader))

    def show(self, label: str, reading: Reading, force: bool = False) -> None:
        if force or reading.at - self.shown_at >= PROGRESS_EVERY_S:
            print(f"  [{label}] {reading.describe()}", flush=True)
            self.shown_at = reading.at

    def new_deaths(self) -> list[Death]:
        """Processes that died since the last call, other than those stopped on purpose."""
        deaths = []
        for name, process in self.processes.items():
            if name in self.down or process.alive() or process.pid in self.seen_dead:
                continue
            self.seen_dead.add(process.pid)
            code = process.proc.returncode if process.proc is not None else None
            death = Death(name, code, last_error(process))
            print(f"  ! {name} died (exit {death.code}): {death.why}", flush=True)
            deaths.append(death)
        return deaths

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything it started."""
        self.down.add(name)
        self.processes[name].kill()

    def stop_redis(self) -> None:
        self.down.add("redis")
        self.redis.shutdown_nosave()

    def restart(self, name: str) -> None:
        process = self.processes[name]
        process.stop(grace_s=0.0)  # whatever is left of it: a dead leader's children too
        if name == "redis":
            self.redis.start()
        else:
            if name == "trainer":
                self.audit.trainer_restarting()
                if "--resume" not in process.argv:
                    process.argv.append("--resume")
            process.start()
            if name in self.health:
                with contextlib.suppress(ProcessDied, TimeoutError):  # seen as a death, or stall
                    process.wait_healthy(self.health[name])
        self.down.discard(name)

    def restart_dead(self) -> list[str]:
        """Restart every process that is not running, Redis and the servers first."""
        dead = [name for name, p in self.processes.items() if not p.alive()]
        order = sorted(dead, key=lambda n: (n != "redis", n not in SERVERS))
        for name in order:
            self.restart(name)
        return order

    def pause(self, label: str, seconds: float) -> list[Death]:
        """Wait, watching for deaths and showing progress."""
        deaths: list[Death] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            deaths += self.new_deaths()
            self.show(label, self.read())
            time.sleep(1.0)
        return deaths

    def settled_reading(self, timeout_s: float = 30.0) -> Reading:
        """A reading with accounts: Redis may take a moment to answer after a restart."""
        deadline = time.monotonic() + timeout_s
        reading = self.read()
        while reading.accounts is None and time.monotonic() < deadline:
            time.sleep(0.5)
            reading = self.read()
        return reading

    def wait_until(
        self,
        label: str,
        done: Callable[[Reading], bool],
        bound_s: float,
        restart_deaths: bool = False,
    ) -> tuple[Reading | None, list[Death]]:
        """The first reading that is `done`, or None after `bound_s` or, unless
        `restart_deaths`, as soon as a process died; and the deaths seen."""
        deaths: list[Death] = []
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            new = self.new_deaths()
            deaths += new
            if new and not restart_deaths:
                return None, deaths
            if new:
                self.restart_dead()
            reading = self.read()
            if done(reading):
                return reading, deaths
            self.show(label, reading)
            time.sleep(1.0)
        return None, deaths

    def wait_for_progress(
        self, label: str, since: Reading, bound_s: float, restart_deaths: bool = False
    ) -> tuple[Reading | None, list[Death]]:
        """Until every stage moved past `since` (see `wait_until`)."""
        return self.wait_until(label, lambda r: r.moved_past(since), bound_s, restart_deaths)

    def stop(self, name: str, grace_s: float) -> None:
        self.down.add(name)
        self.processes[name].stop(grace_s)


@contextmanager
def supervised_stack(run: RunConfig) -> Iterator[Supervisor]:
    """Redis with AOF, then the stack of `rlad up` on it; everything stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="rlad-faults-redis-") as redis_dir:
        redis_server = RedisServer(Path(redis_dir), run.folder / "logs" / "redis.log")
        redis_server.start()
        # `rlad up` uses the Redis in REDIS_URL rather than an embedded one.
        os.environ["REDIS_URL"] = redis_server.url
        try:
            with pipeline(run) as running:
                yield Supervisor(running, redis_server, run)
        finally:
            redis_server.process.stop()
