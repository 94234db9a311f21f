"""`rlad up`: start the whole pipeline on this machine and train to the end."""

from __future__ import annotations

import signal
from pathlib import Path

import typer


def command(
    config: Path = typer.Option(
        Path("configs/tiny-cpu.yaml"), "--config", exists=True, help="Experiment YAML."
    ),
    steps: int | None = typer.Option(None, help="Override trainer.steps."),
    name: str | None = typer.Option(None, help="Override the run name (run folder)."),
    resume: bool = typer.Option(False, help="Continue the run in the same folder."),
    live: bool = typer.Option(True, help="Live table on a terminal."),
    ray: str | None = typer.Option(
        None,
        "--ray",
        is_flag=False,
        flag_value="local",
        metavar="[ADDRESS]",
        help="Every process as a Ray actor: `--ray` alone starts a local Ray, `--ray auto` "
        "joins this machine's cluster, `--ray HOST:6379` another (default: cluster.address).",
    ),
) -> None:
    """Redis, teacher and rollout servers, scorer, rollout worker and trainer, on loopback
    (or, with --ray, on a Ray cluster)."""
    from rich.console import Console

    from services.cli.options import load_run
    from services.common.runtime import configure_logging
    from services.launch.up import up
    from services.queue.access import RedisAccessError

    overrides: dict[str, object] = {}
    if steps is not None:
        overrides["trainer.steps"] = steps
    if name is not None:
        overrides["name"] = name
    run = load_run(config, overrides)
    configure_logging("up")
    # SIGTERM (kill, a supervisor) must stop the children exactly as Ctrl-C does: raising
    # KeyboardInterrupt runs the clean-up that stops every process group.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if ray is not None or run.cluster.address is not None:
            from services.launch.ray_up import LOCAL, ray_up

            address = None if ray == LOCAL else ray
            folder = ray_up(run, address, resume=resume, live=live)
        else:
            folder = up(run, resume=resume, live=live)
    except RedisAccessError as exc:
        raise typer.BadParameter(str(exc), param_hint="REDIS_URL") from None
    Console().print(
        f"[bold green]done[/bold green]: run folder {folder} "
        f"(metrics.jsonl, curves.png, final/, checkpoints/, logs/)"
    )
