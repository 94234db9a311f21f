"""Pipeline benchmark: the real system (`rlad up` machinery) on tiny CPU models.

(a) steady-state step time of RLAD (TRRD, teacher as its own server) vs GRPO (no teacher)
    in the same pipeline — the paper's colocated teacher costs 1.155x (Table 4);
(b) throughput of the pipelined system vs a strictly sequential generate → score → train
    loop (`rollout.synchronous`), both with 200 ms injected per teacher request to model a
    remote teacher;
(c) queue overhead per group (encode, XADD, XREADGROUP, decode, XACK) on a real Redis as a
    share of the step time per group.

Run: `python bench/pipeline.py` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from tiny_stack import base_config

from services.bootstrap.tiny_models import save_tiny_model
from services.common.protocol import CompletionRecord, RolloutGroup
from services.config.algorithm import switch_algorithm
from services.config.run import RunConfig
from services.launch.up import up
from services.queue.connection import connect, embedded_url, start_embedded_redis
from services.queue.keys import ROLLOUTS
from services.queue.queues import GroupQueue
from trainer.metrics_sink import read_metrics

WARMUP_STEPS = 2


def steady_step_time(folder: Path) -> float:
    times = [row["time"] for row in read_metrics(folder / "metrics.jsonl")]
    gaps = [b - a for a, b in itertools.pairwise(times)][WARMUP_STEPS:]
    return statistics.median(gaps)


def run(config: dict[str, Any], name: str, **changes: Any) -> float:
    merged = yaml.safe_load(yaml.safe_dump(config))
    merged["name"] = name
    for dotted, value in changes.items():
        node = merged
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    started = time.perf_counter()
    folder = up(RunConfig.model_validate(merged), live=False)
    step = steady_step_time(folder)
    print(f"  {name:<14} steady step {step:.3f}s  (run {time.perf_counter() - started:.0f}s)")
    return step


def queue_overhead_per_group(group_size: int, tokens: int, repeats: int = 300) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded_redis(Path(tmp) / "bench.db")
        queue = GroupQueue(connect(embedded_url(server)), "bench")
        group = RolloutGroup(
            group_id="g",
            prompt_id="p",
            task="kk",
            policy_version=0,
            prompt_token_ids=list(range(100)),
            completions=[
                CompletionRecord(
                    token_ids=list(range(tokens)),
                    rollout_logprobs=[-1.5] * tokens,
                    teacher_logprobs=[-1.25] * tokens,
                    reward=1.0,
                    finish_reason="stop",
                )
                for _ in range(group_size)
            ],
        )
        started = time.perf_counter()
        for _ in range(repeats):
            queue.publish(ROLLOUTS, group)
            [delivery] = queue.consume(ROLLOUTS, "bench", block_ms=100)
            queue.ack(ROLLOUTS, [delivery.message_id])
        per_group = (time.perf_counter() - started) / repeats
        server.shutdown()
    return per_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-prompts", type=int, default=4, help="B, groups per step.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Completion length limit.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        student = save_tiny_model(folder / "student", "student", seed=0)
        teacher = save_tiny_model(folder / "teacher", "teacher", seed=1)
        config = base_config(folder / "runs", student, teacher, args.steps)
        config["trainer"]["batch_prompts"] = args.batch_prompts
        config["rollout"]["max_tokens"] = args.max_tokens
        batch = config["trainer"]["batch_prompts"]
        print(f"pipeline benchmark: {args.steps} steps, B={batch}, tiny models on CPU")

        print("(a) RLAD vs GRPO, teacher as its own server")
        rlad = run(config, "rlad")
        grpo = run(
            config,
            "grpo",
            algorithm=switch_algorithm(config["algorithm"], "grpo"),
            scorer__mode="passthrough",
        )

        print("(b) pipelined vs sequential, 200 ms per teacher request")
        pipelined = run(config, "async", teacher_server__inject_latency_ms=200)
        sequential = run(
            config, "sync", teacher_server__inject_latency_ms=200, rollout__synchronous=True
        )

        group_size = config["rollout"]["group_size"]
        tokens = config["rollout"]["max_tokens"]
        overhead = queue_overhead_per_group(group_size, tokens)
        share = overhead / (rlad / batch)
        print(
            f"(c) queue overhead {overhead * 1e3:.2f} ms per group of {group_size}x{tokens} tokens"
        )

    print(f"rlad_step_time_s: {rlad:.3f}")
    print(f"grpo_step_time_s: {grpo:.3f}")
    print(f"async_groups_per_s: {batch / pipelined:.3f}")
    print(f"sync_groups_per_s: {batch / sequential:.3f}")
    print(f"queue_overhead_share_of_step: {share:.4f}")
    print(f"rlad_vs_grpo_step_time_ratio: {rlad / grpo:.3f}")
    print(f"async_vs_sync_throughput_ratio: {sequential / pipelined:.3f}")


if __name__ == "__main__":
    main()
