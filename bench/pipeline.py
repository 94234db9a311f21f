"""Pipeline benchmark: the real system (`rlad up` machinery) on the shipped tiny CPU models.

(a) steady-state step time of RLAD (TRRD, teacher as its own server) vs GRPO (no teacher)
    in the same pipeline — the paper's colocated teacher costs 1.155x (Table 4);
(b) throughput of the pipelined system vs a strictly sequential generate → score → train
    loop (`rollout.synchronous`), both with 200 ms injected per teacher request to model a
    remote teacher; and the pipelined step with that latency vs RLAD's without it, which
    the scorer's requests in flight (`scorer.max_in_flight`) should hide;
(c) queue overhead per group (encode, XADD, XREADGROUP, decode, XACK) on a real Redis as a
    share of the step time per group;
(d) teacher tokens per trained token in steady state, with `scorer.skip_zero_variance`
    (the RLAD arm: groups whose rewards are all equal go on without a teacher call) and
    with every group scored.

The four timed arms run in rounds, one after the other and in alternating order, so that
the machine's drift falls on all of them alike; each ratio is taken within a round, and the
median over rounds is printed with the range of the rounds' values, e.g.
`rlad_vs_grpo_step_time_ratio: 0.985 (rounds: 0.951..1.032)`.

The models are the shipped bootstrapped pair (`artifacts/tiny`, what `rlad up` trains), at
the tiny config's completion length (bench/tiny_stack.py says why).

Run: `python bench/pipeline.py` (5 rounds of 8 steps per arm, each arm about 2.2 minutes on
2 CPU cores, most of it starting the servers: about 45 minutes; `--rounds 3`: about 30);
`python bench/pipeline.py --quick` (one round of 5 steps: every figure line, none of them
measured well; about 10 minutes).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tiny_stack import base_config

from services.common.protocol import CompletionRecord, RolloutGroup
from services.config.algorithm import switch_algorithm
from services.config.run import RunConfig
from services.launch.up import pipeline
from services.queue.connection import connect, embedded_url, start_embedded_redis
from services.queue.keys import ROLLOUTS
from services.queue.queues import GroupQueue
from trainer.metrics_sink import read_metrics

WARMUP_STEPS = 2
POLL_S = 0.25  # how often the teachers' token counters are read during an arm
LATENCY_MS = 200


@dataclass
class Arm:
    step_s: float  # steady-state step time: the median gap between steps after the warm-up
    trainer_s: float  # the median time the trainer spent updating and pushing, per step
    teacher_tokens: float  # tokens the teacher scored over the steady steps
    trained_tokens: float  # completion tokens trained on over the same steps


def teacher_tokens(urls: list[str]) -> float | None:
    """Tokens the teachers have returned logprobs for, from their `/metrics`; None when one
    does not answer in time (that reading is skipped)."""
    total = 0.0
    for url in urls:
        try:
            page = httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        for family in text_string_to_metric_families(page):
            if family.name == "rlad_teacher_tokens_scored":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def at(readings: list[tuple[float, float]], when: float) -> float:
    """A counter's value at `when`, linear between the readings around it."""
    for (t0, v0), (t1, v1) in itertools.pairwise(readings):
        if t0 <= when <= t1:
            return v0 + (v1 - v0) * (when - t0) / max(t1 - t0, 1e-9)
    return readings[-1][1] if when > readings[-1][0] else readings[0][1]


def steady(rows: list[dict[str, Any]], readings: list[tuple[float, float]], group_size: int) -> Arm:
    """Figures over the steps after the warm-up: the scorer runs ahead of the trainer by
    the backlog, so the teacher's tokens are counted over the same span of time as the
    steps, not over the whole run."""
    times = [row["time"] for row in rows]
    gaps = [b - a for a, b in itertools.pairwise(times)][WARMUP_STEPS:]
    span = rows[WARMUP_STEPS + 1 :]
    trained = sum(row["groups"] * group_size * row["response_length"] for row in span)
    scored = 0.0
    if readings:
        scored = at(readings, times[-1]) - at(readings, times[WARMUP_STEPS])
    busy = statistics.median(row["step_time_s"] + row.get("push_time_s", 0.0) for row in span)
    return Arm(statistics.median(gaps), busy, scored, trained)


def arm_config(config: dict[str, Any], name: str, changes: dict[str, Any]) -> RunConfig:
    """`config` named `name`, with `changes` given as `block__key: value`."""
    tree = yaml.safe_load(yaml.safe_dump(config))
    tree["name"] = name
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return RunConfig.model_validate(tree)


def run(config: dict[str, Any], name: str, label: str, changes: dict[str, Any]) -> Arm:
    """One arm through the real pipeline, reading the teachers' token counters meanwhile."""
    started = time.perf_counter()
    run_config = arm_config(config, name, changes)
    readings: list[tuple[float, float]] = []
    with pipeline(run_config) as running:
        while running.trainer.alive():
            running.stack.check()
            tokens = teacher_tokens(running.teacher_urls)
            if tokens is not None:
                readings.append((time.time(), tokens))
            time.sleep(POLL_S)
        if running.trainer.wait() != 0:
            raise RuntimeError(f"{name}: trainer failed:\n{running.trainer.tail()}")
    rows = read_metrics(run_config.folder / "metrics.jsonl")
    arm = steady(rows, readings, run_config.rollout.group_size)
    took = time.perf_counter() - started
    print(
        f"  {label:<14} steady step {arm.step_s:.3f}s, trainer busy {arm.trainer_s:.3f}s "
        f"(run {took:.0f}s)",
        flush=True,
    )
    return arm


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


def over_rounds(values: list[float]) -> str:
    """The median, and the range of the rounds' values when there are several."""
    median = f"{statistics.median(values):.3f}"
    if len(values) == 1:
        return median
    return f"{median} (rounds: {min(values):.3f}..{max(values):.3f})"


def tokens_ratio(arms: list[Arm]) -> float:
    return sum(a.teacher_tokens for a in arms) / max(sum(a.trained_tokens for a in arms), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="Trainer steps per arm and round.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of the four timed arms.")
    parser.add_argument("--batch-prompts", type=int, default=4, help="B, groups per step.")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Completion length limit (the config's)."
    )
    parser.add_argument("--quick", action="store_true", help="One round of 5 steps.")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 5, 1
    if args.steps < WARMUP_STEPS + 3:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 3} (the first gaps are warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = base_config(folder / "runs", args.steps)
        config["trainer"]["batch_prompts"] = batch = args.batch_prompts
        if args.max_tokens is not None:
            config["rollout"]["max_tokens"] = args.max_tokens
        latency = {"teacher_server__inject_latency_ms": LATENCY_MS}
        arms: dict[str, dict[str, Any]] = {
            "rlad": {},
            "grpo": {
                "algorithm": switch_algorithm(config["algorithm"], "grpo"),
                "scorer__mode": "passthrough",
            },
            "async": latency,
            "sync": {**latency, "rollout__synchronous": True},
        }
        print(
            f"pipeline benchmark: {args.rounds} rounds of {args.steps} steps per arm, B={batch}, "
            f"the shipped tiny models on CPU; async and sync with {LATENCY_MS} ms per teacher "
            "request"
        )
        results: dict[str, list[Arm]] = {name: [] for name in arms}
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}")
            order = list(arms) if i % 2 == 0 else list(reversed(arms))
            for name in order:
                results[name].append(run(config, f"{name}-r{i}", name, arms[name]))

        print("(d) RLAD scoring every group (scorer.skip_zero_variance off)")
        every_group = run(config, "rlad-all", "rlad-all", {"scorer__skip_zero_variance": False})

        group_size = config["rollout"]["group_size"]
        tokens = config["rollout"]["max_tokens"]
        overhead = queue_overhead_per_group(group_size, tokens)
        print(
            f"(c) queue overhead {overhead * 1e3:.2f} ms per group of {group_size}x{tokens} tokens"
        )

    step = {name: statistics.median(a.step_s for a in runs) for name, runs in results.items()}
    rounds = list(zip(*(results[name] for name in arms), strict=True))
    print(f"rlad_step_time_s: {step['rlad']:.3f}")
    print(f"grpo_step_time_s: {step['grpo']:.3f}")
    print(f"async_groups_per_s: {batch / step['async']:.3f}")
    print(f"sync_groups_per_s: {batch / step['sync']:.3f}")
    print(f"queue_overhead_share_of_step: {overhead / (step['rlad'] / batch):.4f}")
    print(
        "rlad_vs_grpo_step_time_ratio: "
        + over_rounds([r.step_s / g.step_s for r, g, _, _ in rounds])
    )
    print(
        "async_vs_sync_throughput_ratio: "
        + over_rounds([s.step_s / a.step_s for _, _, a, s in rounds])
    )
    print(
        "pipelined_step_with_latency_vs_without_ratio: "
        + over_rounds([a.step_s / r.step_s for r, _, a, _ in rounds])
    )
    print(f"teacher_tokens_per_trained_token: {tokens_ratio(results['rlad']):.3f}")
    print(f"teacher_tokens_per_trained_token_no_skip: {tokens_ratio([every_group]):.3f}")


if __name__ == "__main__":
    main()
