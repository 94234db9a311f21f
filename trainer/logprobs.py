"""Per-token logprobs of given tokens without a [batch, time, vocab] log-softmax.

`log p(y) = logit[y] - logsumexp(logits)`: the gather and the logsumexp only need one
slice of rows at a time, so memory beyond the logits is one fp32 chunk of about
`chunk_elements` values rather than a full log-softmax tensor (and, under autograd, nothing
of vocab size is kept for backward). Used by the trainer and by the transformers backends
of both servers, so that all three compute logprobs the same way. `bench/loss.py` measures
the peak memory against the plain `log_softmax(...).gather(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

# 4 Mi values = 16 MiB of fp32 per chunk: large enough that the Python loop costs nothing
# next to the arithmetic, small next to any real batch of logits.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(
    logits: torch.Tensor,  # [..., vocab]
    temperature: float,
    chunk_elements: int,
) -> Iterator[tuple[slice, torch.Tensor]]:  # (row range, fp32 [rows, vocab] / temperature)
    # A view for contiguous logits; slicing rows of the view copies nothing either.
    flat = logits.reshape(-1, logits.shape[-1])
    step = max(1, chunk_elements // max(1, logits.shape[-1]))
    for start in range(0, flat.shape[0], step):
        rows = flat[start : start + step].float()
        yield slice(start, start + step), rows if temperature == 1.0 else rows / temperature


def _chunked(
    per_row: Callable[[slice, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    temperature: float,
    chunk_elements: int,
) -> torch.Tensor:  # [...] float32
    out = [per_row(rows, chunk) for rows, chunk in _row_chunks(logits, temperature, chunk_elements)]
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


def selective_log_softmax(
    logits: torch.Tensor,  # [..., vocab]
    token_ids: torch.Tensor,  # [...]
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:  # [...] float32
    """`log_softmax(logits / temperature)[..., token_ids]`, computed chunk by chunk in fp32."""
    flat_ids = token_ids.reshape(-1)

    def picked_logprobs(rows: slice, chunk: torch.Tensor) -> torch.Tensor:
        picked = chunk.gather(-1, flat_ids[rows].unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(chunk, dim=-1)

    return _chunked(picked_logprobs, logits, temperature, chunk_elements)


def selective_entropy(
    logits: torch.Tensor,  # [..., vocab]
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:  # [...] float32, no grad
    """Entropy of each position's distribution, chunked like `selective_log_softmax`."""

    def entropy(rows: slice, chunk: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(chunk, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    with torch.no_grad():
        return _chunked(entropy, logits.detach(), temperature, chunk_elements)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,  # [batch, time] right-padded
    attention_mask: torch.Tensor,  # [batch, time] 1 = real token
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each token given its prefix: `[batch, time-1]` for tokens 1..time-1.

    Position t of the result is `log p(input_ids[:, t+1] | input_ids[:, :t+1])`; padded
    positions hold garbage and must be masked by the caller. Logits are divided by the
    sampling temperature so that trainer logprobs match what the sampler drew from.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    # Score every position against the next token (the last one against a dummy id) and
    # drop the last column afterwards: slicing `logits[:, :-1]` first would force a copy
    # of the whole [B, T, V] tensor when it is flattened into rows.
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # [B, T]
    logprobs = selective_log_softmax(logits, next_ids, temperature)[:, :-1]
    entropy = selective_entropy(logits, temperature)[:, :-1] if with_entropy else None
    return logprobs, entropy
