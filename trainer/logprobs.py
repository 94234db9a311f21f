"""Per-token logprobs of given tokens without a [batch, time, vocab] log-softmax.

`log p(y) = logit[y] - logsumexp(logits)`: the gather and the logsumexp only need one
[rows, vocab] slice at a time, so peak memory is one chunk of logits rather than a full
fp32 log-softmax tensor next to the logits. Used by the trainer and by the transformers
backends of both servers, so that all three compute logprobs the same way.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_CHUNK_ROWS = 1024


def selective_log_softmax(
    logits: torch.Tensor,  # [..., vocab]
    token_ids: torch.Tensor,  # [...]
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:  # [...] float32
    """`log_softmax(logits)[..., token_ids]`, computed chunk by chunk in fp32."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = token_ids.reshape(-1)
    out = []
    for start in range(0, flat_logits.shape[0], chunk_rows):
        rows = flat_logits[start : start + chunk_rows].float()
        ids = flat_ids[start : start + chunk_rows]
        picked = rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    if not out:
        return flat_logits.new_zeros(token_ids.shape, dtype=torch.float32)
    return torch.cat(out).reshape(token_ids.shape)


def selective_entropy(
    logits: torch.Tensor,  # [..., vocab]
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:  # [...] float32, no grad
    """Entropy of each position's distribution, chunked like `selective_log_softmax`."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk_rows):
        logp = torch.log_softmax(flat[start : start + chunk_rows].float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    if not out:
        return flat.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


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
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = selective_log_softmax(logits, input_ids[:, 1:])
    entropy = selective_entropy(logits) if with_entropy else None
    return logprobs, entropy
