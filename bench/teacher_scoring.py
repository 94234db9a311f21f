"""Teacher scoring throughput, measured side by side in one run.

1. The same batches scored by the engine in-process and through `rlad serve-teacher`
   over HTTP with the binary (msgpack) body, via `TeacherClient` (target ratio >= 0.85).
2. 16 concurrent clients sending one sequence per request, against a server with
   dynamic batching and one without (target ratio >= 1.5).
3. The same requests again, answered from the logprob cache (speedup of the second pass).

    python bench/teacher_scoring.py [--backend hf|vllm] [--rounds 3] [--clients 16]

Every sequence of parts 1 and 2 is distinct, so the cache (on, as by default) never
answers them; part 3 repeats part 1's batches on purpose. The arms of each part run in
alternating rounds, so that load from other processes affects both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from services.bootstrap.tiny_models import save_tiny_model
from services.clients.teacher import TeacherClient
from services.common.protocol import ScoreRequest, ScoreSequence
from services.common.runtime import free_port
from services.config.servers import TeacherServerConfig
from services.launch.processes import ManagedProcess
from teacher_server.backends import load_engine

RLAD = str(Path(sys.executable).parent / "rlad")
VOCAB = 128


def make_batches(n: int, rows: int, length: int, seed: int) -> list[list[ScoreSequence]]:
    rng = random.Random(seed)
    return [
        [
            ScoreSequence(
                token_ids=[rng.randrange(VOCAB) for _ in range(length)], start=length // 4
            )
            for _ in range(rows)
        ]
        for _ in range(n)
    ]


def start_server(model: Path, backend: str, logs: Path, *flags: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = [RLAD, "serve-teacher", "--model", str(model), "--backend", backend, "--port", str(port)]
    argv += ["--dtype", "float32", "--max-model-len", "1024", "--log-level", "warning", *flags]
    if backend == "vllm":
        argv.append("--enforce-eager")
    env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same as the in-process engine
    }
    proc = ManagedProcess(f"teacher-{port}", argv, logs / f"teacher-{port}.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_healthy(f"{url}/health", timeout_s=600)
    return proc, url


async def http_pass(url: str, batches: list[list[ScoreSequence]]) -> float:
    """Seconds to score `batches` one after another through the binary HTTP API."""
    async with TeacherClient([url], health_interval_s=0) as client:
        began = time.perf_counter()
        for batch in batches:
            await client.score(batch)
        return time.perf_counter() - began


async def concurrent_clients(url: str, work: list[list[list[ScoreSequence]]]) -> float:
    """Seconds for every client to send its requests, each client waiting for its answers."""
    async with TeacherClient([url], health_interval_s=0) as client:

        async def one_client(requests: list[list[ScoreSequence]]) -> None:
            for sequences in requests:
                await client.score(sequences)

        began = time.perf_counter()
        await asyncio.gather(*(one_client(requests) for requests in work))
        return time.perf_counter() - began


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the in-process engine and of each server (one leaves a core "
        "to HTTP and to the other processes of a 2-core machine)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="Alternating A/B rounds per part.")
    parser.add_argument("--batches", type=int, default=4, help="Part 1: batches per round.")
    parser.add_argument("--rows", type=int, default=16, help="Part 1: sequences per batch.")
    parser.add_argument("--length", type=int, default=256, help="Part 1: tokens per sequence.")
    parser.add_argument("--clients", type=int, default=16, help="Part 2: concurrent clients.")
    parser.add_argument("--requests", type=int, default=6, help="Part 2: requests per client.")
    parser.add_argument("--client-length", type=int, default=64, help="Part 2: tokens/request.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    seeds = iter(range(10_000))  # every batch distinct: parts 1 and 2 never hit the cache

    def batches() -> list[list[ScoreSequence]]:
        return make_batches(args.batches, args.rows, args.length, seed=next(seeds))

    def client_work() -> list[list[list[ScoreSequence]]]:
        return [
            make_batches(args.requests, 1, args.client_length, seed=next(seeds))
            for _ in range(args.clients)
        ]

    with tempfile.TemporaryDirectory(prefix="rlad-bench-teacher-") as tmp:
        folder = Path(tmp)
        model = save_tiny_model(folder / "teacher", "teacher", seed=1)
        print(f"backend {args.backend}; tiny teacher (hidden 256, 4 layers); {os.cpu_count()} "
              f"CPUs, {args.threads} torch thread(s) per engine, load average "
              f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
        engine = load_engine(
            TeacherServerConfig(model=str(model), backend=args.backend, dtype="float32",
                                max_model_len=1024, enforce_eager=True)
        )  # fmt: skip
        batched, batched_url = start_server(model, args.backend, folder)
        single, single_url = start_server(model, args.backend, folder, "--no-dynamic-batching")
        try:
            # Warm-up of every path, then A/B rounds alternated so that load drift on a
            # shared machine hits both arms alike.
            for batch in batches():
                engine.score(ScoreRequest(sequences=batch))
            asyncio.run(http_pass(batched_url, batches()))
            for url in (batched_url, single_url):
                asyncio.run(concurrent_clients(url, client_work()))
            in_process_s = http_s = cached_s = coalesced_s = one_by_one_s = 0.0
            for _ in range(args.rounds):
                part1 = batches()
                began = time.perf_counter()
                for batch in part1:
                    engine.score(ScoreRequest(sequences=batch))
                in_process_s += time.perf_counter() - began
                http_s += asyncio.run(http_pass(batched_url, part1))
                cached_s += asyncio.run(http_pass(batched_url, part1))  # part 3: all hits
                one_by_one_s += asyncio.run(concurrent_clients(single_url, client_work()))
                coalesced_s += asyncio.run(concurrent_clients(batched_url, client_work()))
        finally:
            batched.stop()
            single.stop()
            engine.close()

    tokens = args.rounds * args.batches * args.rows * args.length
    part2_tokens = args.rounds * args.clients * args.requests * args.client_length
    print(f"part 1: {args.rounds} x {args.batches} batches x {args.rows} x {args.length} tokens")
    print(f"  in-process engine : {tokens / in_process_s:10.0f} tokens/s")
    print(f"  HTTP, msgpack body: {tokens / http_s:10.0f} tokens/s")
    print(f"part 2: {args.rounds} x {args.clients} clients x {args.requests} requests x 1 x "
          f"{args.client_length} tokens")  # fmt: skip
    print(f"  without batching  : {part2_tokens / one_by_one_s:10.0f} tokens/s")
    print(f"  dynamic batching  : {part2_tokens / coalesced_s:10.0f} tokens/s")
    print("part 3: part 1's batches again, every sequence a cache hit")
    print(f"  cache hits        : {tokens / cached_s:10.0f} tokens/s")
    print(f"cache_hit_speedup: {http_s / cached_s:.2f}")
    print(f"http_vs_inprocess_throughput_ratio: {in_process_s / http_s:.3f}")
    print(f"batched_vs_unbatched_throughput_ratio: {one_by_one_s / coalesced_s:.3f}")


if __name__ == "__main__":
    main()
