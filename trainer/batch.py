"""From scored groups to padded tensors: flatten G completions per group, pack them into
micro-batches under a token budget, and lay every per-token quantity out on the same grid.

Grid: a sequence is `prompt + completion`, right-padded to the micro-batch's longest.
Per-token tensors are `[b, L-1]` in "shifted" coordinates — position t holds the quantity of
token t+1 — which is what `services.common.logprobs.sequence_logprobs` returns. Completion token j
of a prompt of length P therefore sits at position P-1+j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.protocol import RolloutGroup


@dataclass
class Sample:
    """One completion with everything the loss needs about it."""

    input_ids: list[int]  # prompt + completion
    prompt_len: int
    rollout_logprobs: list[float]
    teacher_logprobs: list[float] | None
    advantage: float
    correct: bool | None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, L] long
    attention_mask: torch.Tensor  # [b, L] long
    loss_mask: torch.Tensor  # [b, L-1] float, 1 on completion tokens
    rollout_logprobs: torch.Tensor  # [b, L-1]
    teacher_logprobs: torch.Tensor | None  # [b, L-1]
    advantages: torch.Tensor  # [b]
    correct: torch.Tensor | None  # [b] bool

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def flatten(groups: list[RolloutGroup], advantages: torch.Tensor) -> list[Sample]:
    """`advantages` is [num_groups, G]; completions with no tokens carry no loss and are skipped."""
    samples = []
    for group, group_adv in zip(groups, advantages.tolist(), strict=True):
        for completion, adv in zip(group.completions, group_adv, strict=True):
            if not completion.token_ids:
                continue
            samples.append(
                Sample(
                    input_ids=group.prompt_token_ids + completion.token_ids,
                    prompt_len=len(group.prompt_token_ids),
                    rollout_logprobs=completion.rollout_logprobs,
                    teacher_logprobs=completion.teacher_logprobs,
                    advantage=adv,
                    correct=completion.correct,
                )
            )
    return samples


def pack(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Greedy packing by length: a micro-batch's padded size (rows × longest) stays within
    the budget, so memory per forward is bounded whatever the completion lengths."""
    ordered = sorted(samples, key=lambda s: s.num_tokens, reverse=True)
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    for sample in ordered:
        longest = current[0].num_tokens if current else sample.num_tokens
        if current and (len(current) + 1) * longest > token_budget:
            batches.append(current)
            current = []
        current.append(sample)
    if current:
        batches.append(current)
    return batches


def collate(samples: list[Sample], pad_id: int) -> MicroBatch:
    rows, length = len(samples), max(s.num_tokens for s in samples)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    loss_mask = torch.zeros((rows, length - 1))
    rollout = torch.zeros((rows, length - 1))
    with_teacher = all(s.teacher_logprobs is not None for s in samples)
    teacher = torch.zeros((rows, length - 1)) if with_teacher else None
    for i, sample in enumerate(samples):
        n, first, count = sample.num_tokens, sample.prompt_len - 1, sample.completion_len
        input_ids[i, :n] = torch.tensor(sample.input_ids)
        attention_mask[i, :n] = 1
        loss_mask[i, first : first + count] = 1.0
        rollout[i, first : first + count] = torch.tensor(sample.rollout_logprobs)
        if teacher is not None:
            teacher[i, first : first + count] = torch.tensor(sample.teacher_logprobs)
    correct = (
        torch.tensor([bool(s.correct) for s in samples])
        if all(s.correct is not None for s in samples)
        else None
    )
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logprobs=rollout,
        teacher_logprobs=teacher,
        advantages=torch.tensor([s.advantage for s in samples]),
        correct=correct,
    )


def empty_batch(pad_id: int, with_teacher: bool) -> MicroBatch:
    """A micro-batch with no loss tokens: ranks with fewer micro-batches run these so that
    every rank enters the same number of collective forward/backward passes."""
    zeros = torch.zeros((1, 1))
    return MicroBatch(
        input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
        attention_mask=torch.ones((1, 2), dtype=torch.long),
        loss_mask=zeros,
        rollout_logprobs=zeros,
        teacher_logprobs=zeros if with_teacher else None,
        advantages=torch.zeros(1),
        correct=None,
    )
