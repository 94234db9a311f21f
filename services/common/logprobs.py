"""Per-token logprobs of given tokens without a [batch, time, vocab] log-softmax.

`log p(y) = logit[y] - logsumexp(logits)`: the gather and the logsumexp only need one
slice of rows at a time, so memory beyond the logits is one fp32 chunk of about
`chunk_elements` values rather than a full log-softmax tensor. Under autograd only the
per-row logsumexp is kept; backward recomputes each chunk's softmax and writes
`(onehot(y) − softmax) / temperature` straight into the logits' gradient, in time linear
in the number of chunks (autograd through per-chunk slices would materialise a full-size
zero gradient per chunk). Several ids per position work the same way (the trainer's
logprobs at the teacher's top-k ids: `sequence_top_k_logprobs`), and cost one value each.
Used by the trainer and by the transformers backends of both servers, so that all three
compute logprobs the same way. `bench/loss.py` measures the peak memory against the
plain `log_softmax(...).gather(...)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# 4 Mi values = 16 MiB of fp32 per chunk: large enough that the Python loop costs nothing
# next to the arithmetic, small next to any real batch of logits.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(
    flat_logits: torch.Tensor,  # [rows, vocab]
    temperature: float,
    chunk_elements: int,
) -> Iterator[tuple[slice, torch.Tensor]]:  # (row range, fp32 [chunk rows, vocab] / T)
    step = max(1, chunk_elements // max(1, flat_logits.shape[-1]))
    for start in range(0, flat_logits.shape[0], step):
        rows = flat_logits[start : start + step].float()
        yield slice(start, start + step), rows if temperature == 1.0 else rows / temperature


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,  # [..., vocab]
        token_ids: torch.Tensor,  # [...], or [..., m]: m ids per row
        temperature: float,
        chunk_elements: int,
    ) -> torch.Tensor:  # token_ids' shape, float32
        flat = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits
        flat_ids = _ids_per_row(logits, token_ids)  # [rows, m]
        picked = torch.empty(flat_ids.shape, dtype=torch.float32, device=logits.device)
        log_normalizer = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for rows, chunk in _row_chunks(flat, temperature, chunk_elements):
            torch.logsumexp(chunk, dim=-1, out=log_normalizer[rows])
            picked[rows] = chunk.gather(-1, flat_ids[rows])
        ctx.save_for_backward(logits, token_ids, log_normalizer)
        ctx.temperature, ctx.chunk_elements = temperature, chunk_elements
        return picked.sub_(log_normalizer.unsqueeze(1)).reshape(token_ids.shape)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        logits, token_ids, log_normalizer = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        flat_ids = _ids_per_row(logits, token_ids)  # [rows, m]
        flat_grad = grad_output.reshape(flat_ids.shape).float()  # [rows, m]
        row_grad = flat_grad.sum(dim=1, keepdim=True)  # [rows, 1]
        grad_logits = torch.empty_like(flat)
        for rows, chunk in _row_chunks(flat, ctx.temperature, ctx.chunk_elements):
            # d Σ_i g_i·log p(y_i) / d logit_j = (Σ_i g_i·1[j = y_i] − Σ_i g_i·softmax_j) / T.
            # `chunk` may be a view of the logits themselves: the first op must not be in place.
            grad = (chunk - log_normalizer[rows].unsqueeze(1)).exp_().mul_(-row_grad[rows])
            grad.scatter_add_(-1, flat_ids[rows], flat_grad[rows])
            grad_logits[rows] = grad if ctx.temperature == 1.0 else grad / ctx.temperature
        return grad_logits.reshape(logits.shape), None, None, None


def _ids_per_row(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`token_ids` as [rows, m]: one id per row of `logits`, or m when they carry one more
    dimension than the rows."""
    per_row = token_ids.shape[-1] if token_ids.dim() == logits.dim() else 1
    return token_ids.reshape(-1, per_row)


def selective_log_softmax(
    logits: torch.Tensor,  # [..., vocab]
    token_ids: torch.Tensor,  # [...], or [..., m] for m ids per position
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:  # token_ids' shape, float32
    """`log_softmax(logits / temperature)` at `token_ids`, computed chunk by chunk in fp32."""
    return _SelectiveLogSoftmax.apply(logits, token_ids, temperature, chunk_elements)


def selective_entropy(
    logits: torch.Tensor,  # [..., vocab]
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:  # [...] float32, no grad
    """Entropy of each position's distribution, chunked like `selective_log_softmax`."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for rows, chunk in _row_chunks(flat, temperature, chunk_elements):
            logp = torch.log_softmax(chunk, dim=-1)
            entropy[rows] = -(logp.exp() * logp).sum(-1)
    return entropy.reshape(logits.shape[:-1])


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
    logprobs, _, entropy = sequence_top_k_logprobs(
        model, input_ids, attention_mask, None, temperature, with_entropy
    )
    return logprobs, entropy


def sequence_top_k_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,  # [batch, time] right-padded
    attention_mask: torch.Tensor,  # [batch, time] 1 = real token
    top_k_ids: torch.Tensor | None,  # [batch, time-1, k] more ids to score at each position
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`sequence_logprobs`, and the logprobs of `top_k_ids` at the same positions
    (`[batch, time-1, k]`; None without them) from the same forward pass and softmax: the
    trainer's logprobs at the teacher's top-k ids, for KDRL's `topk` estimator."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    # Score every position against the next token (the last one against a dummy id) and
    # drop the last column afterwards: slicing `logits[:, :-1]` first would force a copy
    # of the whole [B, T, V] tensor when it is flattened into rows.
    ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1).unsqueeze(2)  # [B, T, 1]
    if top_k_ids is not None:  # [B, T, 1 + k], the last position's ids dummies too
        top_k_ids = top_k_ids.to(ids.dtype)
        last = torch.zeros_like(top_k_ids[:, :1])
        ids = torch.cat([ids, torch.cat([top_k_ids, last], dim=1)], dim=2)
    picked = selective_log_softmax(logits, ids, temperature)[:, :-1]  # [B, T-1, 1 + k]
    top_k = picked[..., 1:] if top_k_ids is not None else None
    entropy = selective_entropy(logits, temperature)[:, :-1] if with_entropy else None
    return picked[..., 0], top_k, entropy
