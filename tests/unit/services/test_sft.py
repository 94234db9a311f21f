"""SFT: loss only on completion tokens, and a few steps teach a fixed completion."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from services.bootstrap.sft import SFTConfig, _batch, greedy_completions, sft
from services.bootstrap.tiny_models import TinyModelConfig, build_model, build_tokenizer


def test_batch_masks_only_completion_and_eos() -> None:
    tokenizer = build_tokenizer()
    input_ids, attention, loss_mask = _batch(tokenizer, [("ab", "cde"), ("abcd", "e")])
    assert input_ids.shape == (2, 6)  # "abcd" + "e" + EOS is the longest
    assert attention.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # Position t predicts token t+1: targets are c, d, e, EOS / e, EOS.
    assert loss_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    input_ids, attention, loss_mask = _batch(tokenizer, [("ab", "c"), ("abcd", "e")])
    assert attention[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert loss_mask[0].tolist() == [0, 1, 1, 0, 0]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """As `rlad bootstrap` runs: one thread is much faster on a busy small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_teaches_a_completion_deterministically(one_thread: None) -> None:
    tokenizer = build_tokenizer()
    # Prompts of different lengths: greedy decoding left-pads the shorter one.
    pairs = [("Q: 1+1\n", "<answer>2</answer>"), ("Q: 12+12\n", "<answer>24</answer>")]
    config = SFTConfig(steps=30, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=4)
    models, losses = [], []
    for _ in range(2):
        model = build_model(TinyModelConfig(seed=0), tokenizer)
        losses.append(sft(model, tokenizer, itertools.cycle(pairs), config, log=lambda _: None))
        models.append(model)
    assert losses[0] == losses[1]  # same seed, same data: same run
    assert losses[0][-1] < 0.1 * losses[0][0]
    texts = greedy_completions(models[0], tokenizer, [p for p, _ in pairs], max_new_tokens=24)
    assert texts == [c for _, c in pairs]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
