"""Rollout server benchmark: vLLM vs transformers sampling, and weight-update cost.

    .venv/bin/python bench/rollout.py [--sizes small,medium] [--repeats 3]

For each model size it starts a vLLM and a transformers rollout server on loopback
(`rlad serve-rollout`), samples the same seeded prompts on both (tokens/s), then pushes
fresh weights to the vLLM server through `RolloutClient.push_weights` over both
transports (HTTP upload and shared file, probe-verified) and compares the wall time of a
push with loading the same safetensors file in-process into a transformers model
(`load_state_dict(load_file(path))`). Staging folders and the shared volume live on
/dev/shm when it exists (else the temp dir). Every figure is measured in this run; the last two
lines are the ratios for the largest size (for the update, the slower transport).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from services.bootstrap.tiny_models import TinyModelConfig, save_tiny_model
from services.clients.rollout import RolloutClient
from services.common.protocol import GenerateRequest, SamplingParams
from services.common.runtime import free_port
from services.launch.processes import ManagedProcess
from services.weights.probe import make_probe, probe_token_ids

SIZES = {
    "small": TinyModelConfig(max_position_embeddings=512),
    "medium": TinyModelConfig(
        hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536,
        max_position_embeddings=512,
    ),
}  # fmt: skip
# Staging and the shared volume in RAM when there is a tmpfs (a trainer and a rollout
# server on one node); on disk, writing the update costs more than loading it.
RAM_DISK = Path("/dev/shm")
STAGING = Path(tempfile.mkdtemp(prefix="rlad-bench-", dir=RAM_DISK if RAM_DISK.is_dir() else None))
PROMPTS = [[(7 * i + j) % 100 + 2 for j in range(16)] for i in range(8)]


def start(model: Path, backend: str, logs: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.cli.main", "serve-rollout", "--model", str(model)]
    argv += ["--backend", backend, "--port", str(port), "--work-dir", str(STAGING / str(port))]
    argv += ["--weights-dir", str(logs)]  # where push_seconds writes its file updates
    if backend == "vllm":
        argv += ["--kv-cache-gib", "1"]
    server = ManagedProcess(backend, argv, logs / f"{backend}-{port}.log").start()
    server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout_s=600)
    return server, f"http://127.0.0.1:{port}"


async def tokens_per_s(url: str, repeats: int) -> float:
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=64, seed=0)
    request = GenerateRequest(prompts=PROMPTS, sampling=sampling)
    async with RolloutClient(url) as client:
        await client.generate(request)  # warm-up
        rates = []
        for _ in range(repeats):
            began = time.perf_counter()
            response = await client.generate(request)
            seconds = time.perf_counter() - began
            tokens = sum(len(c.token_ids) for r in response.results for c in r.completions)
            rates.append(tokens / seconds)
    return statistics.median(rates)


def fresh_state(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.state_dict()


def load_in_process(model_dir: Path, state: dict[str, torch.Tensor], scratch: Path, repeats: int):
    """Median seconds to load the update's safetensors file into a transformers model."""
    path = scratch / "baseline.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.load_state_dict(load_file(str(path)))
        times.append(time.perf_counter() - began)
    return statistics.median(times), path.stat().st_size


async def push_seconds(url: str, model_dir: Path, transport: str, scratch: Path, repeats: int):
    """Median wall time of `push_weights` (serialise, send, verify, load, probe)."""
    times = []
    async with RolloutClient(url) as client:
        for _ in range(repeats):
            version = ((await client.info()).policy_version or 0) + 1
            state = fresh_state(model_dir, seed=version)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model.load_state_dict(state)
            probe = make_probe(model, probe_token_ids(128))
            began = time.perf_counter()
            await client.push_weights(
                state,
                version,
                probe,
                transport=transport,
                shared_dir=scratch,  # type: ignore[arg-type]
            )
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rlad-bench-rollout-"))
    results = []
    for size in args.sizes.split(","):
        model_dir = save_tiny_model(scratch / size, SIZES[size], seed=0)
        params = sum(v.numel() for v in load_file(str(model_dir / "model.safetensors")).values())
        rates = {}
        for backend in ("hf", "vllm"):
            server, url = start(model_dir, backend, scratch)
            try:
                rates[backend] = asyncio.run(tokens_per_s(url, args.repeats))
                if backend == "vllm":
                    baseline, nbytes = load_in_process(
                        model_dir, fresh_state(model_dir, 0), scratch, args.repeats
                    )
                    pushes = {
                        t: asyncio.run(push_seconds(url, model_dir, t, STAGING, args.repeats))
                        for t in ("http", "file")
                    }
            finally:
                server.stop()
        ratio = rates["vllm"] / rates["hf"]
        worst = max(pushes.values()) / baseline
        print(f"[{size}] {params / 1e6:.1f}M params, {nbytes / 1e6:.1f} MB fp32")
        print(
            f"[{size}] tokens/s: vllm {rates['vllm']:.0f}, hf {rates['hf']:.0f}, ratio {ratio:.2f}"
        )
        print(
            f"[{size}] weight update: http {pushes['http']:.3f}s, file {pushes['file']:.3f}s, "
            f"in-process safetensors load {baseline:.3f}s, ratio (slower transport) {worst:.2f}"
        )
        results.append((ratio, worst))
    shutil.rmtree(STAGING, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"staging and shared volume: {STAGING.parent}")
    print(f"vllm_vs_hf_tokens_per_s_ratio: {results[-1][0]:.2f}")
    print(f"weight_update_vs_safetensors_load_time_ratio: {results[-1][1]:.2f}")


if __name__ == "__main__":
    main()
