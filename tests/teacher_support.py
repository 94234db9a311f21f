"""Helpers for the teacher server tests: a naive reference forward pass, a teacher app
served in a background thread (real HTTP on loopback, no process start-up; see
`tests.server_support`), a `rlad serve-teacher` child process, and a `vllm serve` one."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from services.common.protocol import ScoreSequence
from services.common.runtime import free_port
from services.config.servers import TeacherServerConfig
from services.launch.processes import ManagedProcess
from teacher_server.app import create_app
from teacher_server.teacher_engine import TeacherEngine
from tests.server_support import ThreadedServer as AppServer

RLAD = str(Path(sys.executable).parent / "rlad")


def random_sequences(
    n: int, seed: int, min_len: int = 4, max_len: int = 48, vocab: int = 128
) -> list[ScoreSequence]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        out.append(ScoreSequence(token_ids=ids, start=rng.randint(1, length - 1)))
    return out


def assert_logprobs_close(actual: list[float], expected: list[float], atol: float = 1e-4) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


class Reference:
    """One sequence at a time, no padding, plain `log_softmax`: the answer to compare with."""

    def __init__(self, model_dir: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def log_softmax(self, seq: ScoreSequence) -> torch.Tensor:  # [n_scored, vocab]
        logits = self.model(torch.tensor([seq.token_ids])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)[seq.start - 1 : -1]

    def logprobs(self, seq: ScoreSequence) -> list[float]:
        rows = self.log_softmax(seq)
        return (
            rows.gather(-1, torch.tensor(seq.token_ids[seq.start :]).unsqueeze(-1))
            .squeeze(-1)
            .tolist()
        )


class ThreadedServer(AppServer):
    """`create_app(config, engine)` under uvicorn in a daemon thread, on a free port."""

    def __init__(
        self, config: TeacherServerConfig, engine: TeacherEngine, port: int | None = None
    ) -> None:
        super().__init__(create_app(config, engine), config.header_timeout_s, port)


def start_teacher(
    model_dir: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[ManagedProcess, str]:
    """`rlad serve-teacher` as a child process; returns it and its URL once healthy."""
    port = free_port()
    proc = ManagedProcess(
        f"teacher-{port}",
        [RLAD, "serve-teacher", "--model", str(model_dir), "--port", str(port), *args],
        log_dir / f"teacher-{port}.log",
        env=env,
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", timeout_s=240)
    except Exception:
        proc.stop()
        raise
    return proc, url


def start_vllm_serve(model_dir: Path, log_dir: Path, *args: str) -> tuple[ManagedProcess, str]:
    """vLLM's own OpenAI-compatible server (`vllm serve`, CPU build, float32, 1 GiB of KV
    cache) as a child process; returns it and its teacher URL (`openai+http://…/v1`) once
    healthy."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", *args]
    proc = ManagedProcess(
        f"vllm-serve-{port}", argv, log_dir / f"vllm-serve-{port}.log",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    ).start()  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", timeout_s=300)
    except Exception:
        proc.stop()
        raise
    return proc, f"openai+{url}/v1"
