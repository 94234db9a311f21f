"""The weight probe: proof that a server serves exactly the weights that were sent.

The sender computes `make_probe(model, token_ids)` with the weights it sends; after
loading, the server scores the same tokens and `check_probe` requires equality within the
probe's tolerance. Both sides derive the tokens with `probe_token_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from services.common.http_server import ApiError
from services.common.logprobs import sequence_logprobs
from services.common.protocol import WeightProbe


def probe_token_ids(vocab_size: int, length: int = 32, seed: int = 0) -> list[int]:
    """A fixed pseudo-random sequence: the same on sender and server for given arguments."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


@torch.no_grad()
def make_probe(model: nn.Module, token_ids: Sequence[int], atol: float = 1e-3) -> WeightProbe:
    """The sender's side: logprobs of `token_ids[1:]` under `model` (temperature 1)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], device=device)
    logprobs, _ = sequence_logprobs(model, ids, torch.ones_like(ids))
    model.train(was_training)
    return WeightProbe(token_ids=list(token_ids), logprobs=logprobs[0].float().tolist(), atol=atol)


def check_probe(probe: WeightProbe, served: Sequence[float]) -> float:
    """Max |served - sent| over the probe; 422 when it exceeds the probe's tolerance."""
    diffs = [abs(a - b) for a, b in zip(served, probe.logprobs, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    if not diffs[worst] <= probe.atol:  # also catches NaN
        raise ApiError(
            422,
            "probe_mismatch",
            f"server logprobs differ from the sender's by {diffs[worst]:.3g} > atol "
            f"{probe.atol:g} (token {worst + 1}: server {served[worst]:.6f}, sender "
            f"{probe.logprobs[worst]:.6f}); the old weights keep serving. Check the dtype "
            "and that the state dict is the model the probe was computed with.",
        )
    return diffs[worst]
