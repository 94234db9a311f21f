"""Supervised fine-tuning of a small causal LM on (prompt, completion) text pairs.

Used by `rlad bootstrap` to teach the tiny teacher the task and to warm the student up:
next-token cross-entropy on the completion tokens only (the prompt is context), AdamW
with linear warm-up and cosine decay, a fixed seed. `greedy_completions` decodes with HF
`generate` for the quick accuracy checks of that training loop; serving and evaluation go
through the rollout engine instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.common.logprobs import sequence_logprobs


class SFTConfig(BaseModel):
    steps: int = Field(default=300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=32, ge=1, description="Examples per step.")
    micro_batch_size: int = Field(
        default=16,
        ge=1,
        description="Examples per forward pass; a step's examples are sorted by length first "
        "so that short ones are not padded to the longest.",
    )
    lr: float = Field(default=2e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warm-up length.")
    weight_decay: float = Field(default=0.01, ge=0)
    seed: int = Field(default=0, description="torch seed (the data order is the stream's).")


def _batch(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and a mask of completion targets `[B, T-1]`."""
    rows, targets = [], []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
        rows.append(ids)
        # Position t predicts token t+1: completion tokens (and EOS) are the targets.
        targets.append([0] * (len(prompt_ids) - 1) + [1] * (len(completion_ids) + 1))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (ids, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(target)] = torch.tensor(target, dtype=torch.float32)
    return input_ids, attention, loss_mask


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterator[tuple[str, str]],
    config: SFTConfig,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train `model` in place on `(prompt, completion)` pairs; returns the loss per step."""
    torch.manual_seed(config.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    def lr_scale(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
    losses: list[float] = []
    start = time.monotonic()
    for step in range(config.steps):
        pairs = sorted(
            (next(examples) for _ in range(config.batch_size)), key=lambda p: len(p[0] + p[1])
        )
        batches = [
            _batch(tokenizer, pairs[i : i + config.micro_batch_size])
            for i in range(0, len(pairs), config.micro_batch_size)
        ]
        targets = sum(loss_mask.sum() for _, _, loss_mask in batches)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for input_ids, attention, loss_mask in batches:
            logprobs, _ = sequence_logprobs(model, input_ids, attention)  # [B, T-1]
            part = -(logprobs * loss_mask).sum() / targets  # mean over the whole step's targets
            part.backward()
            loss += part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        elapsed = time.monotonic() - start
        if step % 25 == 0 or step == config.steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.4f}  {elapsed:6.1f}s")
    model.eval()
    return losses


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy decoding of each prompt (left-padded batches); returns completion texts."""
    model.eval()
    tokenizer.padding_side = "left"
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(  # type: ignore[operator]
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return texts
