"""What the benchmarks that launch the real stack share: the run config they start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def base_config(folder: Path, student: Path, teacher: Path, steps: int) -> dict[str, Any]:
    """`configs/tiny-cpu.yaml` with the given models, run folder and number of steps."""
    config = yaml.safe_load(Path("configs/tiny-cpu.yaml").read_text())
    config.update(run_dir=str(folder), student=str(student), teacher=str(teacher))
    config["trainer"].update(steps=steps, checkpoint_every=steps)
    return config
