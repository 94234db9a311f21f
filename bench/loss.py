"""Loss benchmark: TRRD vs GRPO loss time, and selective vs naive logprob peak memory.

(a) `trainer.loss.policy_loss` forward + backward on one realistic batch (default 256
    completions x 2048 tokens, fp32, CPU) for GRPO (no teacher), TRRD (the paper's ratio
    clamp and the anchor clamp) and KDRL, interleaved in the same run. Time is the
    process's CPU time with one intra-op thread, so that other work on a shared machine
    does not enter the figures; the best of `--repeats` runs is compared.
(b) Peak live tensor memory beyond the logits while computing per-token logprobs from
    [rows, vocab] logits: `services.common.logprobs.selective_log_softmax` vs
    `log_softmax(...).gather(...)`; forward with autograd on (the trainer's case: what is
    kept for backward counts, the headline), without autograd (the servers' case), and
    forward + backward. Measured from the profiler's allocation records, so that the
    allocator's caching and fragmentation do not enter the figures.

Run: `python bench/loss.py` (about a minute; needs ~3 GiB of free memory for (b)).
The last two lines are `selective_logprob_peak_mem_ratio: <x>` (target <= 0.25) and
`trrd_vs_grpo_loss_time_ratio: <x>` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from services.common.logprobs import selective_log_softmax
from services.config.algorithm import AlgorithmConfig, GrpoConfig, KdrlConfig, TrrdConfig
from trainer.advantages import group_advantages
from trainer.loss import LossInputs, policy_loss

GROUP_SIZE = 8
WARMUP = 3
PHASES = {
    "forward": "autograd on: what the trainer holds until backward; the headline",
    "no grad": "the servers' scoring",
    "forward+backward": "both include the logits' own gradient",
}


def realistic_batch(batch: int, time_steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Sampled-token logprobs (mostly near 0, a long negative tail), a trainer slightly off
    the sampler, a teacher that disagrees by ~1 nat, ragged lengths, 0/1 rewards in groups."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, time_steps)
    logp = -torch.empty(shape).exponential_(1.5, generator=gen)
    noise = torch.randn(shape, generator=gen)
    lengths = torch.randint(time_steps // 8, time_steps + 1, (batch,), generator=gen)
    rewards = torch.randint(0, 2, (batch // GROUP_SIZE, GROUP_SIZE), generator=gen).float()
    advantages, _ = group_advantages(rewards, TrrdConfig())
    return {
        "logp": logp,
        "old": (logp + 0.05 * noise).clamp(max=0.0),
        "teacher": (logp + noise.roll(1, dims=1)).clamp(max=0.0),
        "mask": (torch.arange(time_steps) < lengths.unsqueeze(1)).float(),
        "advantages": advantages.reshape(-1),
        "correct": rewards.reshape(-1).bool(),
        "entropy": torch.rand(shape, generator=gen) * 2.0,
    }


def loss_step(data: dict[str, torch.Tensor], config: AlgorithmConfig) -> Callable[[], None]:
    logprobs = data["logp"].clone().requires_grad_(True)

    def step() -> None:
        logprobs.grad = None
        inputs = LossInputs(
            trainer_logprobs=logprobs,
            old_logprobs=data["old"],
            rollout_logprobs=data["old"],
            advantages=data["advantages"],
            loss_mask=data["mask"],
            teacher_logprobs=data["teacher"] if config.uses_teacher else None,
            correct=data["correct"],
            entropy=data["entropy"],
        )
        loss, _ = policy_loss(inputs, config, step=0)
        loss.backward()

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """CPU seconds per call; the order rotates every round so no variant always runs first."""
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.process_time()
            steps[name]()
            times[name].append(time.process_time() - started)
    return times


def naive_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def peak_extra_mib(run: Callable[[], object]) -> float:
    """Peak of live tensor memory above what was allocated before `run` (the CPU analogue
    of torch.cuda.max_memory_allocated), from the profiler's allocation records."""
    with tempfile.TemporaryDirectory() as folder:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            run()
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    records = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not records:
        return 0.0
    before = records[0]["Total Allocated"] - records[0]["Bytes"]
    return (max(r["Total Allocated"] for r in records) - before) / 2**20


def measure_memory(rows: int, vocab: int) -> dict[tuple[str, str], float]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen).requires_grad_(True)
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    weights = torch.randn(rows, generator=gen)
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "naive": naive_log_softmax,
        "selective": selective_log_softmax,
    }
    results = {}
    for name, method in methods.items():

        def forward(method: Callable[..., torch.Tensor] = method) -> None:
            method(logits, ids)

        def no_grad(method: Callable[..., torch.Tensor] = method) -> None:
            with torch.no_grad():
                method(logits, ids)

        def train(method: Callable[..., torch.Tensor] = method) -> None:
            (method(logits, ids) * weights).sum().backward()
            logits.grad = None

        for phase, run in (("forward", forward), ("no grad", no_grad), ("forward+backward", train)):
            results[(name, phase)] = peak_extra_mib(run)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="completions per batch")
    parser.add_argument("--time", type=int, default=2048, help="tokens per completion (padded)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--mem-rows", type=int, default=4096, help="token positions for (b)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size for (b)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = realistic_batch(args.batch, args.time, seed=0)
    tokens = int(data["mask"].sum())
    configs = {
        "grpo": GrpoConfig(),
        "trrd": TrrdConfig(),
        "trrd-anchor": TrrdConfig(clamp_mode="anchor"),
        "kdrl": KdrlConfig(),
    }
    times = time_interleaved(
        {name: loss_step(data, config) for name, config in configs.items()}, args.repeats
    )
    print(
        f"(a) loss forward+backward, {args.batch} x {args.time} fp32 ({tokens} loss tokens), "
        f"{args.threads} thread(s), CPU ms over {args.repeats} interleaved runs"
    )
    print(f"    {'variant':12s} {'best':>8s} {'median':>8s} {'vs grpo':>8s}")
    best = {name: min(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"    {name:12s} {best[name] * 1e3:8.2f} {statistics.median(values) * 1e3:8.2f} "
            f"{best[name] / best['grpo']:8.3f}"
        )

    memory = measure_memory(args.mem_rows, args.vocab)
    logits_mib = args.mem_rows * args.vocab * 4 / 2**20
    print(
        f"(b) logprobs of {args.mem_rows} positions over a {args.vocab} vocabulary "
        f"(logits {logits_mib:.0f} MiB fp32): peak live MiB beyond the logits"
    )
    for phase, note in PHASES.items():
        naive, selective = memory[("naive", phase)], memory[("selective", phase)]
        print(
            f"    {phase:17s} naive {naive:7.1f}  selective {selective:7.1f}  "
            f"ratio {selective / naive:.3f}  ({note})"
        )

    mem_ratio = memory[("selective", "forward")] / memory[("naive", "forward")]
    print(f"selective_logprob_peak_mem_ratio: {mem_ratio:.3f}")
    print(f"trrd_vs_grpo_loss_time_ratio: {best['trrd'] / best['grpo']:.3f}")


if __name__ == "__main__":
    main()
