"""`rlad`: one command-line tool for every process of the stack.

Each subcommand lives in its own module under `services/cli/` and imports its
heavy dependencies (torch, vLLM, DeepSpeed) only when it runs, so `rlad --help` is instant.
"""

from __future__ import annotations

import importlib

import typer

from services.launch.cpu_placement import pin_to_assigned_cores

app = typer.Typer(
    name="rlad",
    help="Reinforcement-aware distillation: RL post-training with a teacher in the loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# (subcommand, module under services.cli); each module defines `command`.
COMMANDS: list[tuple[str, str]] = [
    ("up", "up"),
    ("scale", "scale"),
    ("rollout-worker", "rollout_worker"),
    ("scorer", "scorer"),
    ("train", "train"),
    ("serve-rollout", "serve_rollout"),
    ("serve-teacher", "serve_teacher"),
    ("query-teacher", "query_teacher"),
    ("monitor", "monitor"),
    ("eval", "eval"),
    ("bootstrap", "bootstrap"),
]


@app.callback()
def _start() -> None:
    # Before any subcommand creates a thread: threads and children inherit the affinity.
    pin_to_assigned_cores()


for _name, _module in COMMANDS:
    app.command(_name)(importlib.import_module(f"services.cli.{_module}").command)
# Commands with subcommands of their own: (name, module), each module defines `app`.
for _name, _module in [("dead", "dead")]:
    app.add_typer(importlib.import_module(f"services.cli.{_module}").app, name=_name)

if __name__ == "__main__":  # `python -m services.cli.main`, e.g. under torchrun
    app()
