"""`rlad scale ROLE N`: change a role's replica count in a running `rlad up --ray`."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    role: str = typer.Argument(..., help="teacher, rollout-worker or scorer."),
    replicas: int = typer.Argument(..., min=0, help="How many replicas the role should have."),
    config: Path = typer.Option(
        Path("configs/tiny-cpu.yaml"), "--config", exists=True, help="The run's experiment YAML."
    ),
    name: str | None = typer.Option(None, help="The run name, when `rlad up` overrode it."),
    ray: str = typer.Option("auto", "--ray", help="The Ray cluster the run is deployed on."),
) -> None:
    """New replicas serve within seconds of being ready; removed servers drain first (their
    clients move off, their requests in flight are answered), then stop."""
    from rich.console import Console

    from services.cli.options import load_run
    from services.launch.ray_up import scale

    run = load_run(config, {"name": name} if name else None)
    try:
        names = scale(run, role, replicas, ray)
    except (ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    Console().print(f"{role}: {len(names)} replicas ({', '.join(names) or 'none'})")
