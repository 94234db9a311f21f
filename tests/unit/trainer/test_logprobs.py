"""Selective logprobs equal a naive log_softmax + gather (one id or several per position),
keep nothing of vocab size for backward, and `sequence_logprobs` /
`sequence_top_k_logprobs` equal a plain forward pass of a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.bootstrap.tiny_models import save_tiny_model
from services.common.logprobs import (
    selective_entropy,
    selective_log_softmax,
    sequence_logprobs,
    sequence_top_k_logprobs,
)


def naive_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_elements", [1, 50, 257, 1 << 22])  # 1 row per chunk .. all
@pytest.mark.parametrize("shape", [(3, 7, 50), (11, 50), (50,)])
def test_selective_equals_naive(shape: tuple[int, ...], chunk_elements: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen) * 5
    ids = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    result = selective_log_softmax(logits, ids, chunk_elements=chunk_elements)
    assert result.shape == ids.shape and result.dtype == torch.float32
    torch.testing.assert_close(result, naive_logprobs(logits, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_and_low_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 9, 64).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 64, (4, 9))
    weights = torch.randn(4, 9)
    result = selective_log_softmax(logits, ids, temperature=0.6, chunk_elements=100)
    expected = naive_logprobs(logits, ids, temperature=0.6)
    torch.testing.assert_close(result, expected)
    (grad,) = torch.autograd.grad((result * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad)


def test_masked_vocabulary_entries_are_fine() -> None:
    # Samplers mask logits to −inf (top-k/top-p); the sampled tokens stay finite.
    logits = torch.randn(6, 32)
    logits[:, 16:] = -torch.inf
    ids = torch.randint(0, 16, (6,))
    result = selective_log_softmax(logits, ids, chunk_elements=64)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, naive_logprobs(logits, ids))


def test_gradient_equals_naive_and_nothing_of_vocab_size_is_kept() -> None:
    rows, vocab = 64, 1000
    logits = torch.randn(rows, vocab, requires_grad=True)
    original = logits.detach().clone()
    ids = torch.randint(0, vocab, (rows,))
    weights = torch.randn(rows)
    saved: list[int] = []

    def keep_size(tensor: torch.Tensor) -> torch.Tensor:
        # Views of the logits themselves are free; anything else is new memory.
        if tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
        selective = (selective_log_softmax(logits, ids, chunk_elements=8 * vocab) * weights).sum()
    (grad,) = torch.autograd.grad(selective, logits)
    (expected,) = torch.autograd.grad((naive_logprobs(logits, ids) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)
    assert torch.equal(logits, original)  # fp32 chunks are views: nothing may write into them
    assert max(saved) < vocab  # per-row results and indices only, no [rows, vocab] tensor


def test_entropy_equals_naive() -> None:
    logits = torch.randn(2, 5, 40) * 3
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(selective_entropy(logits, 0.7, chunk_elements=90), expected)


def test_empty_input() -> None:
    logits = torch.randn(0, 7, 10)
    ids = torch.zeros(0, 7, dtype=torch.long)
    assert selective_log_softmax(logits, ids).shape == (0, 7)
    assert selective_entropy(logits).shape == (0, 7)


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder: Path = tmp_path_factory.mktemp("student")
    save_tiny_model(folder, "student", seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sequence_logprobs_match_a_plain_forward(
    tiny_student: torch.nn.Module, temperature: float
) -> None:
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, 8:] = 0  # right padding
    with torch.no_grad():
        logits = tiny_student(input_ids=ids, attention_mask=attention).logits
        logprobs, entropy = sequence_logprobs(
            tiny_student, ids, attention, temperature, with_entropy=True
        )
    expected = naive_logprobs(logits[:, :-1], ids[:, 1:], temperature)
    assert logprobs.shape == entropy.shape == (3, 11)  # type: ignore[union-attr]
    torch.testing.assert_close(logprobs, expected)
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))


def test_sequence_logprobs_backpropagate_like_a_plain_forward(
    tiny_student: torch.nn.Module,
) -> None:
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    weights = torch.randn(2, 9)
    params = [p for p in tiny_student.parameters() if p.requires_grad]
    logprobs, _ = sequence_logprobs(tiny_student, ids, attention, temperature=0.8)
    grads = torch.autograd.grad((logprobs * weights).sum(), params)
    logits = tiny_student(input_ids=ids, attention_mask=attention).logits
    expected = naive_logprobs(logits[:, :-1], ids[:, 1:], temperature=0.8)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1, 40, 1 << 22])
def test_several_ids_per_position_equal_a_naive_gather_and_its_gradient(
    chunk_elements: int,
) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 20, generator=gen) * 3).requires_grad_()
    ids = torch.randint(0, 20, (3, 5, 4), generator=gen)
    ids[0, 0] = torch.tensor([7, 7, 2, 7])  # an id twice: its gradients add up
    weights = torch.randn(3, 5, 4, generator=gen)
    result = selective_log_softmax(logits, ids, 0.7, chunk_elements=chunk_elements)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, ids)
    assert result.shape == ids.shape
    torch.testing.assert_close(result, expected)
    (grad,) = torch.autograd.grad((result * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_sequence_top_k_logprobs_match_a_plain_forward_and_its_gradient(
    tiny_student: torch.nn.Module,
) -> None:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    attention = torch.ones_like(ids)
    top_k_ids = torch.randint(0, 128, (2, 8, 3), generator=gen)
    weights, top_k_weights = torch.randn(2, 8, generator=gen), torch.randn(2, 8, 3, generator=gen)
    params = [p for p in tiny_student.parameters() if p.requires_grad]
    logprobs, top_k, entropy = sequence_top_k_logprobs(
        tiny_student, ids, attention, top_k_ids, temperature=0.8
    )
    assert top_k is not None and entropy is None
    grads = torch.autograd.grad((logprobs * weights).sum() + (top_k * top_k_weights).sum(), params)
    logits = tiny_student(input_ids=ids, attention_mask=attention).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / 0.8, dim=-1)
    expected = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    expected_top_k = logp.gather(-1, top_k_ids)
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(top_k, expected_top_k)
    loss = (expected * weights).sum() + (expected_top_k * top_k_weights).sum()
    for grad, expected_grad in zip(grads, torch.autograd.grad(loss, params), strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
