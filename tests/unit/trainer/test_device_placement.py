"""Nothing in trainer/ assumes the CPU: every tensor the trainer creates names its device,
the engine's (also the device of the process group's collectives) or, for host-side
bookkeeping that never meets the model or a collective, explicitly the CPU."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[3] / "trainer"
CREATORS = {"tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn"}


def creations_without_device() -> list[str]:
    found = []
    for path in sorted(TRAINER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in CREATORS
                and not any(k.arg == "device" for k in node.keywords)
            ):
                found.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    return found


def test_every_tensor_the_trainer_creates_names_its_device() -> None:
    assert creations_without_device() == []
