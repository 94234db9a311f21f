"""`rlad monitor`: queue depths, lag, oldest-message age, throughput, staleness, teacher
latency and trainer progress, read from Redis.

    rlad monitor                                  # live terminal view (rates between refreshes)
    rlad monitor --run tiny-cpu                   # one of several runs sharing the Redis
    rlad monitor --once --json                    # one reading for scripts (counters only)
    rlad monitor --once --json --window 10        # two readings 10 s apart: rates included
    rlad monitor --serve-metrics 9400             # Prometheus exporter (/metrics, /health)
"""

from __future__ import annotations

import time

import typer


def command(
    redis_url: str = typer.Option(
        None,
        "--redis-url",
        envvar="REDIS_URL",
        help="The run's Redis (redis://, rediss:// or unix://).",
    ),
    run: str | None = typer.Option(
        None,
        "--run",
        envvar="RLAD_RUN",
        help="The run to watch (its config's `name`); by default the only run on the Redis.",
    ),
    once: bool = typer.Option(False, "--once", help="Print one reading and exit."),
    json_output: bool = typer.Option(False, "--json", help="With --once: JSON, not tables."),
    window: float = typer.Option(
        0.0, min=0.0, help="With --once: seconds between two readings, to report rates."
    ),
    interval: float = typer.Option(2.0, min=0.1, help="Live view: seconds between refreshes."),
    serve_metrics: int | None = typer.Option(
        None, "--serve-metrics", help="Serve /metrics for Prometheus on this port instead."
    ),
    host: str = typer.Option("127.0.0.1", help="With --serve-metrics: interface to bind."),
) -> None:
    """Watch the queue and the trainer of a running pipeline."""
    from rich.console import Console

    from services.cli.options import redis_client

    if not redis_url:
        # Never the embedded default here: a fresh empty Redis would show a misleading zero.
        raise typer.BadParameter("pass --redis-url or set REDIS_URL to the run's Redis")
    client = redis_client(redis_url)
    if serve_metrics is not None:  # the run may start after the exporter: found per scrape
        import uvicorn

        from services.common.runtime import configure_logging
        from services.monitor.exporter import create_app

        configure_logging("monitor")
        uvicorn.run(create_app(client, run), host=host, port=serve_metrics, log_level="warning")
        return

    from services.cli.options import open_run_reader
    from services.monitor.snapshot import read_snapshot, with_rates
    from services.monitor.view import render, run_live

    console = Console()
    reader = open_run_reader(client, run)
    if not once:
        from services.common.runtime import StopFlag

        run_live(reader, interval, console, should_stop=StopFlag())
        return
    snapshot = read_snapshot(reader)
    if window > 0:
        time.sleep(window)
        snapshot = with_rates(snapshot, read_snapshot(reader))
    if json_output:
        print(snapshot.model_dump_json(indent=2))
    else:
        console.print(render(snapshot))
