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

Beside this entry point: fault_supervisor.py (the stack's processes, started, killed and
restarted), fault_accounts.py (the accounts and the audit of trained groups),
fault_catalogue.py (the faults) and fault_runs.py (trying each fault, the chaos run, the
outcomes).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from fault_accounts import Accounts
from fault_catalogue import FAULTS, QUICK_FAULTS, Fault, Settings
from fault_runs import Outcome, describe_deaths, drain, try_faults, write_table
from fault_supervisor import supervised_stack
from tiny_stack import base_config

from services.config.run import RunConfig

STEPS = 1_000_000  # never reached: the bench stops the trainer itself
FIRST_CHECKPOINT_S = 600.0  # servers, engines and DeepSpeed all start on the same few cores


def run_config(args: argparse.Namespace) -> RunConfig:
    config = base_config(args.runs, STEPS)
    config["name"] = args.name
    config["trainer"]["checkpoint_every"] = args.checkpoint_every
    return RunConfig.model_validate(config)


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
