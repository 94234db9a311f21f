"""`rlad bootstrap`: build the tiny teacher (taught K&K by SFT) and the weak student.

    rlad bootstrap --out artifacts/tiny --seed 0 --budget full

Writes `OUT/teacher` and `OUT/student` (save_pretrained folders with the tokenizer) and
`OUT/bootstrap.json`; does nothing when that folder is complete for the same settings.
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    out: Path = typer.Option(Path("artifacts/tiny"), help="Folder for teacher/ and student/."),
    seed: int = typer.Option(0, help="Seeds models, data and the held-out set."),
    budget: str = typer.Option("full", help="full (the demo's models) or small (seconds)."),
) -> None:
    """Teach a tiny teacher Knights and Knaves, warm up a weaker student, report both."""
    from rich.console import Console
    from rich.table import Table

    from services.bootstrap.build import BootstrapConfig, bootstrap

    if budget not in ("small", "full"):
        raise typer.BadParameter("budget must be small or full", param_hint="--budget")
    config = BootstrapConfig.for_budget(out, seed, budget)  # type: ignore[arg-type]
    result = bootstrap(config, log=typer.echo)
    table = Table(title=f"K&K compact, greedy, held-out ({out})")
    subsets = list(result.teacher.accuracy)
    for column in ("model", *subsets, "reward", "format"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, score in (("teacher", result.teacher), ("student", result.student)):
        table.add_row(
            name,
            *(f"{score.accuracy[s]:.2f}" for s in subsets),
            f"{score.mean_reward:+.2f}",
            f"{score.format_rate:.2f}",
        )
    Console().print(table)
    typer.echo(f"teacher accuracy {result.teacher.accuracy['all']:.3f}")
    typer.echo(f"student accuracy {result.student.accuracy['all']:.3f}")
