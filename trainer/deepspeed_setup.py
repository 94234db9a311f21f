"""DeepSpeed set-up: process group (gloo on CPU, NCCL on GPU), the engine for the student,
and full-weight gathering for pushes and exports at any ZeRO stage.

A single process started without a launcher gets the environment a launcher would give it
(rank 0 of 1, loopback rendezvous), so `rlad train` runs alone or under `deepspeed`/`torchrun`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from services.common.runtime import free_port
from services.config.trainer import TrainerConfig


def init_distributed() -> tuple[int, int]:
    """Returns (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
        )
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def ds_config(config: TrainerConfig, world_size: int) -> dict[str, Any]:
    return {
        # Micro-batches are variable (token budget); accumulation boundaries are set by hand.
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def create_engine(model: torch.nn.Module, config: TrainerConfig, world_size: int) -> Any:
    import deepspeed

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
    """Every parameter in full, on CPU, in fp32 (collective at ZeRO-3: call on all ranks)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def local_grad_norm(engine: Any) -> float | None:
    """L2 norm of the full gradients held on `param.grad` (ZeRO 0/1, before the step);
    None when the gradients are partitioned away (ZeRO 2/3: DeepSpeed reports the norm)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )
