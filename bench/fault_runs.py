"""How bench/faults.py tries each fault and judges it: one fault, then every stage must
move again within `--recover-s` with nothing lost or trained twice (healed when not); the
chaos run; the drain at the end; each fault's `Outcome` as a line and a table row."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fault_accounts import Accounts, Reading, read_accounts
from fault_catalogue import CHAOS_FAULTS, Fault, Settings
from fault_supervisor import SERVERS, Death, Supervisor

CHAOS_GAP_S = (20.0, 40.0)
DRAIN_S = 120.0
TRAINER_STOP_S = 180.0  # the last checkpoint and the exported student


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


def write_table(path: Path, outcomes: list[Outcome]) -> None:
    header = (
        "| fault | went on by itself | produced | trained | stale | dead | lost "
        "| trained twice | time to recover |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(o.row() + "\n" for o in outcomes))


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
