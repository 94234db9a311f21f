"""DeepSpeed set-up: process group and device (NCCL on GPUs, gloo on the CPU), the engine
for the student, and full-weight gathering for pushes and exports at any ZeRO stage.

A single process started without a launcher gets the environment a launcher would give it
(rank 0 of 1, loopback rendezvous), so `rlad train` runs alone or under `deepspeed`/`torchrun`.
The rendezvous store takes unauthenticated connections: a rank 0 that hosts it on a
loopback `MASTER_ADDR` listens on that address alone, where torch's own store would listen
on every interface; a non-loopback `MASTER_ADDR` (several nodes) keeps torch's store.
DeepSpeed's accelerator (`DS_ACCELERATOR`, or what it detects) decides the device: every
tensor the trainer makes goes to `engine.device`, which is also where NCCL wants the
tensors of a collective.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from services.common.precision import resolve_training_dtype
from services.config.trainer import TrainerConfig
from trainer.weight_buckets import iter_buckets, plan

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Gathering for a full state dict (HTTP/file pushes, exports) goes one bucket at a time too.
STATE_BUCKET_BYTES = 256 * 1024 * 1024


def on_gpu() -> bool:
    """Whether DeepSpeed's accelerator is CUDA (it follows `DS_ACCELERATOR` when set)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().device_name() == "cuda")


def init_distributed() -> tuple[int, int]:
    """Returns (rank, world_size); on a GPU, binds this process to GPU `LOCAL_RANK`."""
    if dist.is_initialized():  # a second trainer in one process joins the group it has
        return dist.get_rank(), dist.get_world_size()
    listener = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # Alone, not under torchrun: a store of its own on a free loopback port, held from
        # now on (whatever a parent that ran a trainer itself left in the environment).
        listener = _listen("127.0.0.1", 0)
        port = listener.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if on_gpu() else "gloo"
    if on_gpu():
        # Before the process group exists: NCCL ties each rank's communicator to the
        # current device, and every rank would otherwise pick GPU 0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if listener is None and _hosts_loopback_store(rank):
        listener = _listen(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    if listener is not None:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=True,
            timeout=default_pg_timeout,
            master_listen_fd=listener.detach(),
        )
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    # DeepSpeed takes over a process group that exists, else makes its own (env://).
    deepspeed.init_distributed(dist_backend=backend)
    return rank, world


def _hosts_loopback_store(rank: int) -> bool:
    """Whether this rank hosts the rendezvous store at a loopback `MASTER_ADDR` (under
    torchrun the launcher's agent hosts it instead)."""
    host = os.environ.get("MASTER_ADDR")
    if rank != 0 or not host or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    try:
        address = socket.getaddrinfo(host, None)[0][4][0]
    except socket.gaierror:
        return False  # torch's rendezvous reports an address it cannot resolve
    return ipaddress.ip_address(address).is_loopback


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


def training_dtype(config: TrainerConfig) -> Literal["fp32", "bf16"]:
    """`trainer.dtype`, with `auto` resolved: bf16 on a GPU, fp32 on the CPU."""
    return resolve_training_dtype(config.dtype, on_gpu())


def ds_config(config: TrainerConfig, world_size: int) -> dict[str, Any]:
    return {
        # Micro-batches are variable (token budget); accumulation boundaries are set by hand.
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": training_dtype(config) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def create_engine(model: PreTrainedModel, config: TrainerConfig, world_size: int) -> Any:
    import deepspeed

    if config.gradient_checkpointing:
        # Non-reentrant: works with ZeRO-3's parameter hooks and inputs without gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # A torch optimizer: DeepSpeed's CPU Adam would compile for minutes on first use.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99)
    )
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(config, world_size),
    )
    return engine


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full, on the CPU, in fp32; at ZeRO-3 gathered one
    bucket at a time (a collective: call on all ranks)."""
    module = engine.module
    state: dict[str, torch.Tensor] = {}
    for bucket in iter_buckets(plan(module, STATE_BUCKET_BYTES), zero_stage):
        for entry in bucket:
            value = entry.value().float().cpu().clone()
            state.update(dict.fromkeys(entry.names, value))  # tied names share one copy
    for name, buffer in module.state_dict().items():
        state.setdefault(name, buffer.detach().float().cpu().clone())
    return state


def local_grad_norm(engine: Any) -> float | None:
    """L2 norm of the full gradients held on `param.grad` (ZeRO 0/1, before the step);
    None when the gradients are partitioned away (ZeRO 2/3: DeepSpeed reports the norm)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
