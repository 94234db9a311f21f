"""From scored groups to padded tensors: flatten G completions per group, pack them into
micro-batches under a token budget, and lay every per-token quantity out on the same grid.

Grid: a sequence is `prompt + completion`, right-padded to the micro-batch's longest.
Per-token tensors are `[b, L-1]` in "shifted" coordinates — position t holds the quantity of
token t+1 — which is what `services.common.logprobs.sequence_logprobs` returns. Completion token j
of a prompt of length P therefore sits at position P-1+j.

With KDRL's `topk` estimator, the teacher's top-k ids and logprobs of each completion
token lie on the same grid with a last dimension of k: `[b, L-1, k]`.

Groups may come without teacher logprobs: degraded ones (no teacher answered, see
services/workers/scorer.py) and those the scorer skipped because their rewards are all
equal. Their rows carry `has_teacher` 0, and the loss trains them with α = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.protocol import RolloutGroup, TeacherTopK


@dataclass
class Sample:
    """One completion with everything the loss needs about it."""

    input_ids: list[int]  # prompt + completion
    prompt_len: int
    rollout_logprobs: list[float]
    teacher_logprobs: list[float] | None  # None: no teacher (degraded or skipped group)
    teacher_top_k: TeacherTopK | None  # None: no teacher, or a scorer without top_k
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
    # Always present, so that every micro-batch of every rank yields the same metrics.
    teacher_logprobs: torch.Tensor  # [b, L-1], 0 on rows without a teacher
    advantages: torch.Tensor  # [b]
    correct: torch.Tensor | None  # [b] bool
    has_teacher: torch.Tensor | None  # [b] float 1/0; None: every row has one
    # KDRL's topk estimator only (else None); 0 on rows without a teacher.
    teacher_top_k_ids: torch.Tensor | None = None  # [b, L-1, k] long
    teacher_top_k_logprobs: torch.Tensor | None = None  # [b, L-1, k]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def teacher_tokens(self) -> int:
        """Loss tokens of the rows with teacher logprobs (what teacher metrics average)."""
        if self.has_teacher is None:
            return self.num_tokens
        return int((self.loss_mask.sum(dim=1) * self.has_teacher).sum().item())


def flatten(groups: list[RolloutGroup], advantages: torch.Tensor) -> list[Sample]:
    """`advantages` is [num_groups, G]; completions with no tokens carry no loss and are
    skipped. A degraded group's teacher logprobs, if any, are not used. The trainer's
    intake (trainer/intake.py) has made sure that every group carries the teacher
    logprobs its loss reads."""
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
                    teacher_logprobs=None if group.degraded else completion.teacher_logprobs,
                    teacher_top_k=None if group.degraded else completion.teacher_top_k,
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


def _on_grid(sample: Sample, values: list[float], width: int) -> list[float]:
    """One row of a per-token tensor: `values` of the completion tokens at their shifted
    positions, zeros elsewhere."""
    first = sample.prompt_len - 1
    return [0.0] * first + list(values) + [0.0] * (width - first - len(values))


def _top_k_on_grid(
    samples: list[Sample], width: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [b, width, k] long, logprobs [b, width, k]
    """The teacher's top-k of each completion token at its shifted position, zeros
    elsewhere; `top_k` is the k every scored completion carries (the intake checks it)."""
    # Filled on the host row by row, then copied to the engine's device in one go.
    ids = torch.zeros((len(samples), width, top_k), dtype=torch.long, device="cpu")
    logprobs = torch.zeros((len(samples), width, top_k), device="cpu")
    for row, sample in enumerate(samples):
        if sample.teacher_top_k is not None:
            tokens = slice(sample.prompt_len - 1, sample.prompt_len - 1 + sample.completion_len)
            ids[row, tokens] = torch.from_numpy(sample.teacher_top_k.id_array().astype("int64"))
            logprobs[row, tokens] = torch.from_numpy(sample.teacher_top_k.logprob_array())
    return ids, logprobs


def collate(samples: list[Sample], pad_id: int, device: torch.device, top_k: int = 0) -> MicroBatch:
    """Pad `samples` into one micro-batch on `device` (the engine's: one copy per tensor);
    with `top_k`, the teacher's top-k too (KDRL's topk estimator)."""
    length = max(s.num_tokens for s in samples)
    width = length - 1
    teacher_rows = [s.teacher_logprobs is not None for s in samples]
    with_verdicts = all(s.correct is not None for s in samples)
    top_k_ids = top_k_logprobs = None
    if top_k:
        top_k_ids, top_k_logprobs = (t.to(device) for t in _top_k_on_grid(samples, width, top_k))
    return MicroBatch(
        input_ids=torch.tensor(
            [s.input_ids + [pad_id] * (length - s.num_tokens) for s in samples],
            dtype=torch.long,
            device=device,
        ),
        attention_mask=torch.tensor(
            [[1] * s.num_tokens + [0] * (length - s.num_tokens) for s in samples],
            dtype=torch.long,
            device=device,
        ),
        loss_mask=torch.tensor(
            [_on_grid(s, [1.0] * s.completion_len, width) for s in samples], device=device
        ),
        rollout_logprobs=torch.tensor(
            [_on_grid(s, s.rollout_logprobs, width) for s in samples], device=device
        ),
        teacher_logprobs=torch.tensor(
            [_on_grid(s, s.teacher_logprobs or [], width) for s in samples], device=device
        ),
        has_teacher=None
        if all(teacher_rows)
        else torch.tensor(teacher_rows, dtype=torch.float32, device=device),
        advantages=torch.tensor([s.advantage for s in samples], device=device),
        correct=torch.tensor([bool(s.correct) for s in samples], device=device)
        if with_verdicts
        else None,
        teacher_top_k_ids=top_k_ids,
        teacher_top_k_logprobs=top_k_logprobs,
    )


def empty_batch(pad_id: int, device: torch.device, top_k: int = 0) -> MicroBatch:
    """A micro-batch with no loss tokens: ranks with fewer micro-batches run these so that
    every rank enters the same number of collective forward/backward passes."""
    zeros = torch.zeros((1, 1), device=device)
    top_k_zeros = torch.zeros((1, 1, top_k), device=device) if top_k else None
    return MicroBatch(
        input_ids=torch.full((1, 2), pad_id, dtype=torch.long, device=device),
        attention_mask=torch.ones((1, 2), dtype=torch.long, device=device),
        loss_mask=zeros,
        rollout_logprobs=zeros,
        teacher_logprobs=zeros,
        advantages=torch.zeros(1, device=device),
        correct=None,
        has_teacher=None,
        teacher_top_k_ids=None if top_k_zeros is None else top_k_zeros.long(),
        teacher_top_k_logprobs=top_k_zeros,
    )
