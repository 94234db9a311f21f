"""rlad's teacher server against `vllm serve` as a teacher, measured side by side in one run.

Both serve the same tiny teacher on vLLM's engine in float32 (`rlad serve-teacher
--backend vllm` and `vllm serve`), and `TeacherClient` scores the same sequences on each:
through `POST /v1/score` (msgpack) on one, `POST /v1/completions` with `prompt_logprobs`
on the other (`openai+http://…/v1`). 16 concurrent clients, rounds alternating A B A B …
so that load from other processes hits both alike; every round's sequences are new (the
rlad teacher's cache never answers).

    python bench/teacher_vs_vllm_serve.py [--rounds 5] [--clients 16] [--quick]

Prints `rlad_vs_vllm_serve_scoring_throughput_ratio` (the median over rounds of rlad's
tokens/s over vllm serve's, with the spread) and the bytes on the wire (request and
answer bodies) per scored token of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from teacher_scoring import make_batches, start_server

from services.bootstrap.tiny_models import save_tiny_model
from services.clients.teacher import TeacherClient
from services.common.protocol import ScoreSequence
from services.common.runtime import free_port
from services.launch.processes import ManagedProcess


def start_vllm_serve(model: Path, logs: Path) -> tuple[ManagedProcess, str]:
    """`vllm serve` with the settings `start_server` gives `rlad serve-teacher`."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    argv += ["--max-model-len", "1024", "--enforce-eager", "--uvicorn-log-level", "warning"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    proc = ManagedProcess(f"vllm-serve-{port}", argv, logs / f"vllm-serve-{port}.log", env=env)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", timeout_s=600)
    return proc, f"openai+{url}/v1"


class WireCounter:
    """Bytes of the request and answer bodies that pass through a client."""

    def __init__(self) -> None:
        self.bytes = 0

    async def request(self, request: httpx.Request) -> None:
        self.bytes += len(request.content)

    async def response(self, response: httpx.Response) -> None:
        await response.aread()
        self.bytes += len(response.content)


async def concurrent_scoring(url: str, work: list[list[list[ScoreSequence]]]) -> tuple[float, int]:
    """Seconds for every client to score its requests one after another, and the bytes of
    the bodies on the wire (`concurrent_clients` of bench/teacher_scoring.py, counted)."""
    counter = WireCounter()
    async with TeacherClient([url], health_interval_s=0) as client:
        assert client._http is not None  # its connection pool: hooks count what goes through
        client._http.event_hooks = {"request": [counter.request], "response": [counter.response]}

        async def one_client(requests: list[list[ScoreSequence]]) -> None:
            for sequences in requests:
                await client.score(sequences)

        began = time.perf_counter()
        await asyncio.gather(*(one_client(requests) for requests in work))
        return time.perf_counter() - began, counter.bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (A B A B ...).")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    parser.add_argument("--requests", type=int, default=4, help="Requests per client per round.")
    parser.add_argument("--rows", type=int, default=2, help="Sequences per request.")
    parser.add_argument("--length", type=int, default=256, help="Tokens per sequence.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server.")
    parser.add_argument("--quick", action="store_true", help="2 rounds of little work.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.length = 2, 1, 64
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    seeds = iter(range(10_000))

    def work() -> list[list[list[ScoreSequence]]]:
        return [
            make_batches(args.requests, args.rows, args.length, seed=next(seeds))
            for _ in range(args.clients)
        ]

    scored = args.clients * args.requests * args.rows * (args.length - args.length // 4)
    rates: dict[str, list[float]] = {"rlad": [], "vllm_serve": []}
    wire: dict[str, int] = {"rlad": 0, "vllm_serve": 0}
    with tempfile.TemporaryDirectory(prefix="rlad-bench-vllm-serve-") as tmp:
        folder = Path(tmp)
        model = save_tiny_model(folder / "teacher", "teacher", seed=1)
        print(f"tiny teacher (hidden 256, 4 layers) on vLLM, float32; {os.cpu_count()} CPUs, "
              f"{args.threads} torch thread(s) per server; load average "
              f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
        # no cache on the rlad side: it would only cost (every round's sequences are new)
        servers = {"rlad": start_server(model, "vllm", folder, "--cache-bytes", "0")}
        try:
            servers["vllm_serve"] = start_vllm_serve(model, folder)
            for _, url in servers.values():  # warm-up of both paths
                asyncio.run(concurrent_scoring(url, work()))
            for _ in range(args.rounds):
                for name, (_, url) in servers.items():  # A then B, each on new sequences
                    seconds, bytes_ = asyncio.run(concurrent_scoring(url, work()))
                    rates[name].append(scored / seconds)
                    wire[name] += bytes_
        finally:
            for proc, _ in servers.values():
                proc.stop()

    ratios = [a / b for a, b in zip(rates["rlad"], rates["vllm_serve"], strict=True)]
    print(f"{args.rounds} rounds x {args.clients} clients x {args.requests} requests x "
          f"{args.rows} sequences x {args.length} tokens ({scored} scored a round)")  # fmt: skip
    for name, label in (("rlad", "rlad serve-teacher"), ("vllm_serve", "vllm serve")):
        print(f"  {label:<19}: median {statistics.median(rates[name]):8.0f} scored tokens/s "
              f"(rounds {', '.join(f'{r:.0f}' for r in rates[name])})")  # fmt: skip
    print(f"rlad_vs_vllm_serve_scoring_throughput_ratio: {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}..{max(ratios):.3f})")  # fmt: skip
    for name in ("rlad", "vllm_serve"):
        print(f"{name}_wire_bytes_per_token: {wire[name] / (scored * args.rounds):.1f}")


if __name__ == "__main__":
    main()
