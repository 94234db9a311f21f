"""Batch assembly: alignment of per-token quantities, token-budget packing, padding."""

from __future__ import annotations

import torch

from services.common.protocol import CompletionRecord, RolloutGroup, TeacherTopK
from trainer.batch import MicroBatch, collate, empty_batch, flatten, pack

CPU = torch.device("cpu")


def group(prompt: list[int], completions: list[list[int]]) -> RolloutGroup:
    return RolloutGroup(
        group_id="g",
        prompt_id="p",
        task="t",
        policy_version=0,
        prompt_token_ids=prompt,
        completions=[
            CompletionRecord(
                token_ids=ids,
                rollout_logprobs=[-float(i + 1) for i in range(len(ids))],
                teacher_logprobs=[-10.0 - i for i in range(len(ids))],
                reward=1.0,
                finish_reason="stop",
                correct=bool(len(ids) % 2),
            )
            for ids in completions
        ],
    )


def test_completion_tokens_land_on_shifted_positions() -> None:
    # Prompt [5, 6, 7] (P=3), completion [8, 9]: logprob of token 8 is predicted from
    # position 2 (the last prompt token), token 9 from position 3 → positions 2 and 3.
    samples = flatten([group([5, 6, 7], [[8, 9], [8]])], torch.tensor([[0.5, -0.5]]))
    batch = collate(samples, pad_id=0, device=CPU)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert batch.rollout_logprobs.tolist() == [[0, 0, -1, -2], [0, 0, -1, 0]]
    assert batch.teacher_logprobs is not None
    assert batch.teacher_logprobs.tolist() == [[0, 0, -10, -11], [0, 0, -10, 0]]
    assert batch.advantages.tolist() == [0.5, -0.5]
    assert batch.correct is not None and batch.correct.tolist() == [False, True]
    assert batch.num_tokens == 3


def test_empty_completions_are_skipped() -> None:
    samples = flatten([group([1, 2], [[], [3]])], torch.tensor([[1.0, -1.0]]))
    assert [s.input_ids for s in samples] == [[1, 2, 3]]
    assert samples[0].advantage == -1.0


def test_packing_respects_the_token_budget_and_keeps_every_sample() -> None:
    lengths = [3, 10, 4, 7, 7, 2, 9]
    prompt = [1]
    samples = flatten(
        [group(prompt, [[2] * (n - 1) for n in lengths])], torch.zeros((1, len(lengths)))
    )
    batches = pack(samples, token_budget=16)
    assert sorted(s.num_tokens for b in batches for s in b) == sorted(lengths)
    for b in batches:
        assert len(b) * max(s.num_tokens for s in b) <= 16 or len(b) == 1


def test_empty_batch_has_no_loss_tokens() -> None:
    batch = empty_batch(pad_id=0, device=CPU)
    assert batch.num_tokens == batch.teacher_tokens == 0


def tensors_of(batch: MicroBatch) -> list[torch.Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


def test_every_tensor_of_a_micro_batch_is_made_on_the_given_device() -> None:
    # The meta device stands in for a GPU: a tensor built on the CPU and left there would
    # meet the model on another device, which CUDA refuses at the first forward.
    meta = torch.device("meta")
    samples = flatten([group([5, 6, 7], [[8, 9], [8]])], torch.tensor([[0.5, -0.5]]))
    batches = (collate(samples, 0, meta), empty_batch(0, meta))
    for batch in (*batches, collate(samples, 0, meta, top_k=2), empty_batch(0, meta, top_k=2)):
        assert tensors_of(batch) and {t.device for t in tensors_of(batch)} == {meta}


def unscored(prompt: list[int], completions: list[list[int]], degraded: bool) -> RolloutGroup:
    bare = group(prompt, completions)
    for completion in bare.completions:
        completion.teacher_logprobs = None
    bare.degraded = degraded
    return bare


def test_rows_without_a_teacher_are_marked_and_zero_on_the_teacher_grid() -> None:
    scored = group([5, 6, 7], [[8, 9]])
    degraded = unscored([5, 6], [[8, 9, 10]], degraded=True)
    degraded.completions[0].teacher_logprobs = [-1.0, -2.0, -3.0]  # left by a call cut short
    samples = flatten([scored, degraded], torch.tensor([[0.5], [-0.5]]))
    assert samples[1].teacher_logprobs is None  # a degraded group's are never used
    batch = collate(samples, pad_id=0, device=CPU)
    assert batch.has_teacher is not None and batch.has_teacher.tolist() == [1.0, 0.0]
    assert batch.teacher_logprobs.tolist() == [[0, 0, -10, -11], [0, 0, 0, 0]]
    assert (batch.num_tokens, batch.teacher_tokens) == (5, 2)
    assert collate(samples[:1], pad_id=0, device=CPU).has_teacher is None  # all have one


def test_the_teachers_top_k_lands_on_the_completion_positions() -> None:
    scored = group([5, 6, 7], [[8, 9], [4]])
    first, second = scored.completions
    first.teacher_top_k = TeacherTopK.from_rows([[8, 1], [9, 2]], [[-0.5, -2.0], [-0.25, -1.0]], 2)
    second.teacher_top_k = TeacherTopK.from_rows([[4, 3]], [[-0.125, -4.0]], 2)
    samples = flatten([scored], torch.tensor([[0.5, -0.5]]))
    batch = collate(samples, 0, CPU, top_k=2)
    assert batch.teacher_top_k_ids is not None and batch.teacher_top_k_logprobs is not None
    assert batch.teacher_top_k_ids.shape == batch.teacher_top_k_logprobs.shape == (2, 4, 2)
    # prompt of 3: completion token j sits at position 2 + j; zeros elsewhere
    assert batch.teacher_top_k_ids[0].tolist() == [[0, 0], [0, 0], [8, 1], [9, 2]]
    assert batch.teacher_top_k_logprobs[1].tolist() == [[0, 0], [0, 0], [-0.125, -4.0], [0, 0]]
    assert collate(samples, 0, CPU).teacher_top_k_ids is None  # not asked for: not built
    empty = empty_batch(0, CPU, top_k=2)
    assert empty.teacher_top_k_ids is not None and empty.teacher_top_k_ids.shape == (1, 1, 2)
