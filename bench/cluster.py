"""The stack on Ray: what the actors cost, and how fast a scaled-up teacher serves.

(a) `ray_vs_local_step_time_ratio`: the median steady trainer step time of `rlad up --ray`
    (a local one-node Ray, the same CPU placement) over that of `rlad up`, on the same
    config, the two alternating in one run;
(b) `scale_up_to_first_request_s`: from asking the deployment's controller for a second
    teacher (what `rlad scale teacher 2` asks) on a running `rlad up --ray` to the first
    score request the new replica served (its /metrics): its start, its model load, its
    registration, and the scorer finding it in the registry.

    python bench/cluster.py --quick     # one round of 6 steps each, then the scale-up
    python bench/cluster.py             # three rounds of 20 steps each
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pipeline import steady
from tiny_stack import base_config

from services.config.run import RunConfig
from services.launch.ray_actors import import_ray
from services.launch.ray_up import ray_pipeline, ray_up
from services.launch.up import up
from trainer.metrics_sink import read_metrics

SERVED = re.compile(r'^rlad_teacher_requests_total\{status="200"\} (\S+)$', re.MULTILINE)


def requests_served(teacher_url: str) -> float:
    # The servers of a Ray deployment require the run's API key (they listen beyond loopback).
    headers = {"Authorization": f"Bearer {os.environ['RLAD_API_KEY']}"}
    response = httpx.get(f"{teacher_url}/metrics", headers=headers, timeout=5.0)
    response.raise_for_status()
    found = SERVED.search(response.text)
    return float(found.group(1)) if found else 0.0


def step_times(config: dict[str, Any], rounds: int) -> tuple[list[float], list[float]]:
    local, on_ray = [], []
    for round_ in range(rounds):
        for label, times in (("local", local), ("ray", on_ray)):
            run = RunConfig.model_validate({**config, "name": f"{label}-{round_}"})
            started = time.perf_counter()
            folder = up(run, live=False) if label == "local" else ray_up(run, None, live=False)
            rows = read_metrics(folder / "metrics.jsonl")
            times.append(steady(rows, [], run.rollout.group_size).step_s)
            print(
                f"  {label:<5} round {round_}: steady step {times[-1]:.3f}s "
                f"(run {time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    return local, on_ray


def scale_up_to_first_request(config: dict[str, Any], timeout_s: float = 600.0) -> float:
    ray = import_ray()
    run = RunConfig.model_validate({**config, "name": "scale"})
    run.trainer.steps = 1_000_000  # stopped with the deployment
    with ray_pipeline(run) as running:
        metrics = run.folder / "metrics.jsonl"
        deadline = time.monotonic() + timeout_s
        while not metrics.exists() or not metrics.read_text().strip():
            assert time.monotonic() < deadline, "no trainer step"
            time.sleep(0.5)
        asked = time.perf_counter()
        ray.get(running.controller.scale.remote("teacher", 2))
        new = ray.get(running.controller.addresses.remote("teacher"))[-1]
        while requests_served(new) == 0:
            assert time.monotonic() < deadline, "the new teacher served nothing"
            time.sleep(0.2)
        return time.perf_counter() - asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One round of 6 steps.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rounds, steps = (1, 6) if args.quick else (args.rounds, args.steps)
    os.environ.setdefault("RLAD_API_KEY", secrets.token_urlsafe(24))
    with tempfile.TemporaryDirectory() as tmp:
        config = base_config(Path(tmp) / "runs", steps)
        print(f"cluster benchmark: {rounds} round(s) of {steps} steps, the shipped tiny models")
        local, on_ray = step_times(config, rounds)
        ratio = statistics.median(on_ray) / statistics.median(local)
        print(f"ray_vs_local_step_time_ratio {ratio:.3f}")
        print(f"scale_up_to_first_request_s {scale_up_to_first_request(config):.1f}")


if __name__ == "__main__":
    main()
