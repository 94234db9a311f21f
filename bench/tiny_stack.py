"""What the benchmarks that launch the real stack share: the run config they start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG = Path("configs/tiny-cpu.yaml")


def base_config(folder: Path, steps: int) -> dict[str, Any]:
    """`configs/tiny-cpu.yaml` with the given run folder and number of steps, on its own
    models: the shipped bootstrapped pair (`artifacts/tiny`), whose groups earn different
    rewards, so that the trainer really updates and the teacher really scores (untrained
    models earn -1 on every sample: every group and every update would be skipped)."""
    config = yaml.safe_load(CONFIG.read_text())
    for role in ("student", "teacher"):
        if not Path(config[role]).is_dir():
            raise SystemExit(f"no {role} at {config[role]}: run `rlad bootstrap` first")
    config["run_dir"] = str(folder)
    config["trainer"].update(steps=steps, checkpoint_every=steps)
    return config
