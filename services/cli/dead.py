"""`rlad dead`: the groups a run parked as dead letters, and putting them back.

    rlad dead list                      # newest first: id, source stream, age, reason
    rlad dead list --json               # the same for scripts
    rlad dead replay 1733-0 1734-0      # back on the stream each came from
    rlad dead replay --all              # every dead letter of the run

A group is parked when it could not be used: undecodable, refused by the teacher as
invalid input, malformed for the trainer, or delivered `queue.max_deliveries` times without
being finished. Once the cause is fixed (a teacher restarted with the right tokenizer, a
scorer bug fixed), replay puts it back where it was; it is then counted as queued again,
not dead, and `replayed` grows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import redis

    from services.queue.queues import QueueReader

app = typer.Typer(help="List and replay a run's dead-lettered groups.", no_args_is_help=True)

RedisUrl = typer.Option(None, "--redis-url", envvar="REDIS_URL", help="The run's Redis.")
Run = typer.Option(
    None, "--run", envvar="RLAD_RUN", help="The run (its config's `name`); default: the only one."
)


def _reader(redis_url: str | None, run: str | None) -> tuple[redis.Redis, QueueReader]:
    from services.cli.options import open_run_reader, redis_client

    if not redis_url:
        raise typer.BadParameter("pass --redis-url or set REDIS_URL", param_hint="--redis-url")
    client = redis_client(redis_url)
    return client, open_run_reader(client, run)


@app.command("list")
def list_dead(
    redis_url: str | None = RedisUrl,
    run: str | None = Run,
    count: int = typer.Option(50, min=1, max=10_000, help="How many, newest first."),
    json_output: bool = typer.Option(False, "--json", help="JSON lines, not a table."),
) -> None:
    """The newest dead letters with their reason."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    _, reader = _reader(redis_url, run)
    letters = reader.recent_dead(count)
    if json_output:
        for letter in letters:
            print(json.dumps(asdict(letter)))
        return
    now_ms = reader.server_time_ms()
    table = Table(title=f"run {reader.keys.run}: {len(letters)} dead letters", title_justify="left")
    for column in ("id", "from", "age", "reason"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        age_s = (now_ms - int(letter.id.partition("-")[0])) / 1000
        table.add_row(
            letter.id, letter.source, time.strftime("%H:%M:%S", time.gmtime(age_s)), letter.reason
        )
    Console().print(table)


@app.command("replay")
def replay(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids, as `rlad dead list` shows them."),
    every: bool = typer.Option(False, "--all", help="Replay every dead letter of the run."),
    redis_url: str | None = RedisUrl,
    run: str | None = Run,
) -> None:
    """Put dead letters back on the stream they came from."""
    from services.queue.queues import GroupQueue

    if bool(ids) == every:
        raise typer.BadParameter("give dead-letter ids, or --all (not both)")
    client, reader = _reader(redis_url, run)
    if every:
        ids = [letter.id for letter in reader.recent_dead(1_000_000)]
    replayed = GroupQueue(client, reader.keys.run).replay(ids)
    typer.echo(f"replayed {len(replayed)} of {len(ids)}")
    missing = sorted(set(ids) - set(replayed))
    if missing:
        typer.echo(f"not dead letters of run {reader.keys.run}: {' '.join(missing)}", err=True)
        raise typer.Exit(1)
