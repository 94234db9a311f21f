"""Fault injection on the real stack: each process killed in turn, Redis restarted, then chaos.

The bench is the supervisor, as docker compose's `restart: unless-stopped` would be. It
starts a `redis-server` with AOF (every write fsynced before it is acknowledged) on a free
loopback port, and on it the stack of `rlad up` with the tiny CPU models (teacher and
rollout servers, scorer, rollout worker, trainer). Then, one fault at a time, it kills one
process with SIGKILL, or stops Redis (SHUTDOWN NOSAVE, or kill -9) and starts it again on
the same port and append-only file, and restarts only what it stopped: the trainer with
`--resume`. The run *went on by itself* when no other process died and, within
`--recover-s` of that restart (a server's restart ends when it answers `/health`, as
compose's healthchecks have it), every stage moved again: the rollout worker produced a
group, the scorer scored one and the trainer logged a step. Time to recover runs from the
fault to that moment. Last, a chaos run kills the teacher, the scorer, the trainer or the
rollout server, or restarts Redis, every 20-40 s; there the supervisor restarts whatever
dies, and the run went on by itself when nothing died that was not killed and every stage
moved again after the last fault.

After each fault, and at the end (producers stopped, the scorer drained, the trainer
stopped so that it checkpoints and acknowledges what it trained), the accounts: produced,
trained, stale, dead (by reason), still in the streams (delivered and unacknowledged, or
not delivered yet), lost (produced less all of those), and the groups trained twice: in two
steps of `trained_groups.jsonl` that both survived, the steps past the checkpoint that a
resume restored being rolled back. A fault *failed* when the run did not go on by itself,
or a group was lost or trained twice since the previous fault. A failed fault is healed
(what died is restarted, or everything but Redis when nothing died) before the next one.

    python bench/faults.py --quick     # three faults and 60 s of chaos (6-7 minutes on 2 cores)
    python bench/faults.py             # the seven faults, then 300 s of chaos (about 12 minutes)
    python bench/faults.py --faults trainer,redis-kill --chaos-s 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from tiny_stack import base_config

from services.config.run import RunConfig
from services.launch.processes import ManagedProcess, ProcessDied
from services.launch.redis_server import RedisServer
from services.launch.up import Pipeline, pipeline
from services.queue.connection import connect
from services.queue.keys import SCORERS
from services.queue.queues import QueueReader
from trainer import checkpoint

TINY = Path("artifacts/tiny")
STEPS = 1_000_000  # never reached: the bench stops the trainer itself
SERVERS = ("rollout", "teacher")  # restarted before the processes that call them
PROGRESS_EVERY_S = 10.0
CHAOS_GAP_S = (20.0, 40.0)
FIRST_CHECKPOINT_S = 600.0  # servers, engines and DeepSpeed all start on the same few cores
DRAIN_S = 120.0
TRAINER_STOP_S = 180.0  # the last checkpoint and the exported student


# ---------------------------------------------------------------- what the run did


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file that the trainer wrote, less one a kill cut short."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


@dataclass
class Accounts:
    produced: int
    scored: int
    trained: int
    stale: int
    dead: int
    dead_reasons: Counter[str]
    waiting: int  # in the streams: delivered and not acknowledged, or not delivered yet
    waiting_rollouts: int  # of which in rlad:rollouts

    @property
    def lost(self) -> int:
        return self.produced - self.trained - self.stale - self.dead - self.waiting

    def dead_by_reason(self) -> str:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in self.dead_reasons.most_common())
        return f"{self.dead} ({reasons})" if reasons else str(self.dead)


def read_accounts(reader: QueueReader) -> Accounts | None:
    """The run's accounts, or None while Redis cannot be read. Counters and streams are
    read until the counters did not move in between: every move of a group from one
    account to another changes a counter, so the figures then agree with each other."""
    try:
        for _ in range(20):
            counters = reader.stats()
            progress = reader.groups_progress()
            if reader.stats() != counters:
                continue
            dead = counters.get("dead", 0)
            reasons = Counter(d.reason for d in reader.recent_dead(dead)) if dead else Counter()
            return Accounts(
                produced=counters.get("produced", 0),
                scored=counters.get("scored", 0),
                trained=counters.get("trained", 0),
                stale=counters.get("stale", 0),
                dead=dead,
                dead_reasons=reasons,
                waiting=sum(p.pending + p.lag for p in progress),
                waiting_rollouts=sum(p.pending + p.lag for p in progress if p.group == SCORERS),
            )
    except redis.RedisError:
        pass
    return None


class TrainingAudit:
    """`trained_groups.jsonl` across trainer restarts. A resume restores the newest
    checkpoint, so the lines its predecessors wrote for later steps were rolled back."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "trained_groups.jsonl"
        self.latest = folder / "checkpoints" / checkpoint.LATEST
        self.restarts: list[tuple[int, int]] = []  # (bytes written before it, step restored)
        self.unreadable = 0  # lines of the last reading that were not JSON

    def trainer_restarting(self) -> int:
        """Call with the trainer dead, before it starts again: the step it will restore."""
        restored = 0
        if self.latest.exists():
            restored = checkpoint.Progress.model_validate_json(self.latest.read_text()).step
        written = self.path.stat().st_size if self.path.exists() else 0
        self.restarts.append((written, restored))
        return restored

    def surviving_steps(self) -> list[tuple[int, list[str]]]:
        """(step, groups) of every line that no resume rolled back."""
        data = self.path.read_bytes() if self.path.exists() else b""
        history: list[tuple[int, list[str]]] = []
        restarts = list(self.restarts)
        offset = 0
        self.unreadable = 0
        for raw in data.splitlines(keepends=True):
            while restarts and restarts[0][0] <= offset:
                restored = restarts.pop(0)[1]
                history = [(step, groups) for step, groups in history if step <= restored]
            offset += len(raw)
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:  # cut short by a kill mid-write
                self.unreadable += 1
                continue
            history.append((line["step"], line["groups"]))
        for _, restored in restarts:
            history = [(step, groups) for step, groups in history if step <= restored]
        return history

    def trained_twice(self) -> int:
        counts = Counter(g for _, groups in self.surviving_steps() for g in groups)
        return sum(1 for n in counts.values() if n > 1)


@dataclass
class Reading:
    at: float  # time.monotonic()
    steps_logged: int  # lines of metrics.jsonl, across restarts
    last_step: int | None
    accounts: Accounts | None

    def moved_past(self, before: Reading) -> bool:
        """Every stage moved since `before`: a group produced, one scored, a trainer step."""
        if self.accounts is None or before.accounts is None:
            return False
        return (
            self.steps_logged > before.steps_logged
            and self.accounts.produced > before.accounts.produced
            and self.accounts.scored > before.accounts.scored
        )

    def describe(self) -> str:
        step = f"step {self.last_step}" if self.last_step is not None else "no step yet"
        if self.accounts is None:
            return f"{step} · Redis unreachable"
        a = self.accounts
        return (
            f"{step} · produced {a.produced} scored {a.scored} trained {a.trained} "
            f"stale {a.stale} dead {a.dead} in streams {a.waiting}"
        )


# ---------------------------------------------------------------- the supervisor


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


# ---------------------------------------------------------------- faults


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


# ---------------------------------------------------------------- results


@dataclass
class Outcome:
    title: str
    went_on: bool
    accounts: Accounts | None
    trained_twice: int
    new_lost: int  # since the previous fault
    new_twice: int
    recovery: str  # time to recover, as shown
    notes: list[str] = field(default_factory=list)
    stack_broken: bool = False  # stood still even after healing: no later fault is tried

    @property
    def failed(self) -> bool:
        return not self.went_on or self.new_lost > 0 or self.new_twice > 0

    def line(self) -> str:
        verdict = "FAILED" if self.failed else "ok"
        on = "went on by itself" if self.went_on else "did NOT go on by itself"
        a = self.accounts
        figures = (
            "accounts unreadable"
            if a is None
            else f"produced {a.produced} trained {a.trained} stale {a.stale} "
            f"dead {a.dead_by_reason()} in streams {a.waiting} lost {a.lost}"
        )
        notes = "".join(f"; {note}" for note in self.notes)
        return (
            f"{verdict}: {self.title}: {on}, recovered {self.recovery}; {figures}; "
            f"trained twice {self.trained_twice}{notes}"
        )

    def row(self) -> str:
        a = self.accounts
        cells = [self.title, "yes" if self.went_on else "**no**"]
        if a is None:
            cells += ["?"] * 5
        else:
            cells += [str(a.produced), str(a.trained), str(a.stale), a.dead_by_reason()]
            cells += [str(a.lost)]
        cells += [str(self.trained_twice), self.recovery]
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


class Tally:
    """Lost and trained-twice figures at the previous fault, to tell what a fault added."""

    def __init__(self) -> None:
        self.lost = 0
        self.twice = 0

    def outcome(
        self,
        supervisor: Supervisor,
        title: str,
        went_on: bool,
        recovery: str,
        notes: list[str],
    ) -> Outcome:
        accounts = read_accounts(supervisor.reader)
        twice = supervisor.audit.trained_twice()
        lost = accounts.lost if accounts is not None else self.lost
        outcome = Outcome(
            title, went_on, accounts, twice, lost - self.lost, twice - self.twice, recovery, notes
        )
        self.lost, self.twice = lost, twice
        print(outcome.line(), flush=True)
        return outcome


def describe_deaths(deaths: list[Death]) -> list[str]:
    return [f"{d.name} died (exit {d.code}): {d.why}" for d in deaths]


def seconds(value: float) -> str:
    return f"{value:.0f} s"


# ---------------------------------------------------------------- the runs


def heal(supervisor: Supervisor, bound_s: float) -> tuple[Reading | None, list[Death]]:
    """What an operator does after a failed fault: restart what died, or, when nothing
    died and the run still stands, every process but Redis (the trainer resumes). The
    reading once every stage moved again (None if not within `bound_s`), and the deaths
    seen meanwhile."""
    restarted = supervisor.restart_dead()
    if not restarted:
        restarted = [name for name in supervisor.processes if name != "redis"]
        for name in sorted(restarted, key=lambda n: n not in SERVERS):
            supervisor.restart(name)
    print(f"  healing: restarted {', '.join(restarted)}", flush=True)
    since = supervisor.settled_reading()
    return supervisor.wait_for_progress("healing", since, bound_s, restart_deaths=True)


def single_fault(supervisor: Supervisor, fault: Fault, settings: Settings, tally: Tally) -> Outcome:
    print(f"fault: {fault.title}", flush=True)
    supervisor.show(fault.name, supervisor.read(), force=True)
    fault_at = time.monotonic()
    deaths = fault.inject(supervisor, settings)
    restarted = supervisor.settled_reading()
    moved, later = supervisor.wait_for_progress(fault.name, restarted, settings.recover_s)
    deaths += later
    went_on = moved is not None and not deaths
    stalled = moved is None and not deaths
    healed, late = heal(supervisor, settings.recover_s) if not went_on else (None, [])
    deaths += late  # the same fault, seen while healing
    notes = describe_deaths(deaths)
    if stalled:
        notes.append(f"no progress in every stage within {settings.recover_s:.0f} s")
    if moved is not None and went_on:
        recovery = seconds(moved.at - fault_at)
    elif healed is not None:
        recovery = f"— (healed: {seconds(healed.at - fault_at)})"
    else:
        recovery = "—"
        notes.append(f"healing did not make the run move again within {settings.recover_s:.0f} s")
    outcome = tally.outcome(supervisor, fault.title, went_on, recovery, notes)
    outcome.stack_broken = not went_on and healed is None
    return outcome


def chaos(supervisor: Supervisor, duration_s: float, settings: Settings, tally: Tally) -> Outcome:
    """Random faults every 20-40 s; whatever dies is restarted, and counted against the run."""
    title = f"chaos, {duration_s:.0f} s"
    print(f"fault: {title}", flush=True)
    deaths: list[Death] = []
    injected: list[str] = []
    recoveries: list[float] = []
    end = time.monotonic() + duration_s
    next_at = time.monotonic() + random.uniform(*CHAOS_GAP_S)
    fault_at, since = 0.0, supervisor.read()
    recovered = True
    while time.monotonic() < end:
        new = supervisor.new_deaths()
        if new:
            deaths += new
            supervisor.restart_dead()
        reading = supervisor.read()
        if not recovered and reading.moved_past(since):
            recoveries.append(reading.at - fault_at)
            recovered = True
            print(f"  moved again {recoveries[-1]:.0f} s after the fault", flush=True)
        if time.monotonic() >= next_at:
            fault = random.choice(CHAOS_FAULTS)
            if not recovered:
                print("  (the previous fault had not recovered yet)", flush=True)
            print(f"  chaos: {fault.title}", flush=True)
            injected.append(fault.title)
            fault_at = time.monotonic()
            deaths += fault.inject(supervisor, settings)
            since, recovered = supervisor.settled_reading(), False
            next_at = time.monotonic() + random.uniform(*CHAOS_GAP_S)
        supervisor.show("chaos", reading)
        time.sleep(1.0)
    went_on_after_last = recovered
    if not recovered:  # the bound runs from the last restart, as for a single fault
        left_s = settings.recover_s - (time.monotonic() - since.at)
        moved, late = supervisor.wait_for_progress("chaos", since, left_s, restart_deaths=True)
        deaths += late
        went_on_after_last = moved is not None
        if moved is not None:
            recoveries.append(moved.at - fault_at)
    notes = ["faults: " + ", ".join(f"{n}× {t}" for t, n in Counter(injected).items())]
    notes += describe_deaths(deaths)
    if not went_on_after_last:
        notes.append(f"no progress within {settings.recover_s:.0f} s of the last fault")
    recovery = (
        f"median {seconds(statistics.median(recoveries))}, max {seconds(max(recoveries))}"
        if recoveries
        else "—"
    )
    went_on = went_on_after_last and not deaths
    return tally.outcome(supervisor, title, went_on, recovery, notes)


def drain(supervisor: Supervisor) -> Accounts:
    """Stop the producer, let the scorer finish what is queued, stop the trainer (it
    checkpoints and acknowledges what it trained), then the rest; the final accounts."""
    print("end: stopping the rollout worker, draining, stopping the trainer", flush=True)
    supervisor.stop("rollout-worker", grace_s=30.0)
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        accounts = read_accounts(supervisor.reader)
        if accounts is not None and accounts.waiting_rollouts == 0:
            break
        time.sleep(1.0)
    supervisor.stop("trainer", grace_s=TRAINER_STOP_S)
    for name in ("scorer", "teacher", "rollout"):
        supervisor.stop(name, grace_s=30.0)
    accounts = read_accounts(supervisor.reader)
    if accounts is None:
        raise RuntimeError("Redis could not be read at the end")
    return accounts


def run_config(args: argparse.Namespace) -> RunConfig:
    config = base_config(args.runs, TINY / "student", TINY / "teacher", STEPS)
    config["name"] = args.name
    config["trainer"]["checkpoint_every"] = args.checkpoint_every
    return RunConfig.model_validate(config)


def write_table(path: Path, outcomes: list[Outcome]) -> None:
    header = (
        "| fault | went on by itself | produced | trained | stale | dead | lost "
        "| trained twice | time to recover |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(o.row() + "\n" for o in outcomes))


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


def try_faults(
    supervisor: Supervisor, faults: list[Fault], chaos_s: float, settings: Settings
) -> list[Outcome]:
    tally = Tally()
    outcomes: list[Outcome] = []
    for fault in faults:
        outcomes.append(single_fault(supervisor, fault, settings, tally))
        if outcomes[-1].stack_broken:
            print("the stack stands still: no further fault tried", flush=True)
            return outcomes
    if chaos_s > 0:
        outcomes.append(chaos(supervisor, chaos_s, settings, tally))
    return outcomes


def run_bench(
    args: argparse.Namespace, run: RunConfig, faults: list[Fault]
) -> tuple[list[Outcome], Accounts, int]:
    """The outcome of each fault, the final accounts and the groups trained twice."""
    settings = Settings(args.recover_s, args.teacher_down_s)
    with supervised_stack(run) as supervisor:
        print(f"stack up on {supervisor.redis.url}; waiting for the first checkpoint", flush=True)
        # From then on a killed trainer has a checkpoint to resume from.
        checkpointed, deaths = supervisor.wait_until(
            "start", lambda r: r.accounts is not None and r.accounts.trained > 0, FIRST_CHECKPOINT_S
        )
        if checkpointed is None:
            raise RuntimeError(f"the stack never checkpointed: {describe_deaths(deaths)}")
        outcomes = try_faults(supervisor, faults, args.chaos_s, settings)
        final = drain(supervisor)
        twice = supervisor.audit.trained_twice()
    print(
        f"end: produced {final.produced} trained {final.trained} stale {final.stale} "
        f"dead {final.dead_by_reason()} in streams {final.waiting} lost {final.lost}; "
        f"trained twice {twice}",
        flush=True,
    )
    if supervisor.audit.unreadable:
        print(f"  {supervisor.audit.unreadable} lines of trained_groups.jsonl were cut short")
    return outcomes, final, twice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [f.name for f in FAULTS]
    parser.add_argument("--faults", default=",".join(names), help=f"Some of {','.join(names)}.")
    parser.add_argument("--chaos-s", type=float, default=300.0, help="Chaos run length; 0: none.")
    parser.add_argument(
        "--quick", action="store_true", help=f"{','.join(QUICK_FAULTS)}, 60 s of chaos."
    )
    parser.add_argument(
        "--recover-s",
        type=float,
        default=90.0,
        help="Seconds every stage has to move again after a restart.",
    )
    parser.add_argument("--teacher-down-s", type=float, default=30.0, help="Teacher outage.")
    parser.add_argument(
        "--checkpoint-every", type=int, default=5, help="Steps between the trainer's checkpoints."
    )
    parser.add_argument("--seed", type=int, default=0, help="Of the chaos run's faults.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="Folder of run folders.")
    parser.add_argument("--name", default="faults", help="Run name: the run folder is RUNS/NAME.")
    parser.add_argument("--table", type=Path, help="Markdown table (default: in the run folder).")
    args = parser.parse_args()
    if args.quick:
        args.faults, args.chaos_s = ",".join(QUICK_FAULTS), min(args.chaos_s, 60.0)
    unknown = set(args.faults.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {names}")
    random.seed(args.seed)
    run = run_config(args)
    shutil.rmtree(run.folder, ignore_errors=True)  # logs are appended to: start clean
    faults = [f for f in FAULTS if f.name in args.faults.split(",")]
    print(f"fault injection: {len(faults)} faults, chaos {args.chaos_s:.0f} s, run {run.folder}")
    started = time.monotonic()
    outcomes, final, twice = run_bench(args, run, faults)
    print(f"ran {time.monotonic() - started:.0f} s")
    print(f"faults_tried: {len(outcomes)}")
    print(f"faults_failed: {sum(o.failed for o in outcomes)}")
    print(f"groups_lost: {final.lost}")
    print(f"groups_double_trained: {twice}")
    table = args.table or run.folder / "faults.md"
    write_table(table, outcomes)
    print(f"table: {table}")
    sys.exit(1 if any(o.failed for o in outcomes) else 0)


if __name__ == "__main__":
    main()
