"""Checkpoints that make queue consumption exactly-once for training.

A checkpoint holds the DeepSpeed engine state (model, optimizer, scheduler) plus the
trainer's progress: step, policy version, and the ids of the groups whose updates it
contains. Groups are acknowledged on the queue only after the checkpoint that contains
them is on disk; on `--resume`, pending groups listed in the checkpoint are acknowledged
without training again, and the others are trained again (their update was lost).

A checkpoint also holds where the prompt stream stands (`prompt_cursor`), so that a resume
continues it rather than starting the seeded prompt order again. At least once: it is the
lowest position of any group still in the queue, and not in this checkpoint, when the
checkpoint was saved (`prompt_low_water`), and a resume raises the run's cursor to it,
never lowers it. With the Redis kept, the cursor there is already past it and the queued
groups are still there: nothing is generated twice. With a new Redis, the queued groups
are gone and their prompts are generated again (with any above the lowest one that were
trained already). Prompts a rollout worker had taken but not yet published when it died
are not generated again (at most `prompts_per_request` per worker lost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

LATEST = "latest_progress.json"


class Progress(BaseModel):
    step: int = 0
    policy_version: int = 0
    consumed: list[str] = Field(
        default_factory=list,
        description="Queue ids trained since the previous checkpoint: this rank's while it "
        "trains, every rank's in a saved checkpoint.",
    )
    tag: str = ""
    prompt_cursor: int = Field(
        default=0,
        description="Where a resume continues the prompt stream: the lowest position of a "
        "group still in the queue at the save (see the module docstring).",
    )


def save(engine: Any, folder: Path, progress: Progress, keep: int, is_main: bool) -> None:
    """Collective: every rank calls it. The progress file is written last, by rank 0, so a
    crash mid-save leaves the previous checkpoint as the one `load` finds."""
    progress.tag = f"step-{progress.step:06d}"
    engine.save_checkpoint(
        str(folder), tag=progress.tag, client_state={"rlad": progress.model_dump()}
    )
    if is_main:
        tmp = folder / (LATEST + ".tmp")
        tmp.write_text(progress.model_dump_json())
        tmp.replace(folder / LATEST)
        tags = sorted(p for p in folder.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine: Any, folder: Path) -> Progress | None:
    """Restore the newest complete checkpoint into `engine`; None when there is none."""
    marker = folder / LATEST
    if not marker.exists():
        return None
    progress = Progress.model_validate(json.loads(marker.read_text()))
    load_path, _ = engine.load_checkpoint(str(folder), tag=progress.tag)
    if load_path is None:
        raise RuntimeError(f"checkpoint {folder / progress.tag} is unreadable")
    return progress
