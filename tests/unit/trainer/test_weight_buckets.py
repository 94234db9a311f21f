"""Buckets of the student's parameters: every parameter exactly once with all of its names
(tied embeddings have two), consecutive, and never more bytes than asked unless a single
parameter is larger on its own."""

from __future__ import annotations

from torch import nn

from trainer.weight_buckets import iter_buckets, plan


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)  # 400 fp32 values: 1600 bytes
        self.hidden = nn.Linear(8, 8)  # 256 + 32 bytes
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight


def test_buckets_cover_every_parameter_once_within_the_budget() -> None:
    model = Tied()
    buckets = plan(model, bucket_bytes=512)
    flat = [e for bucket in buckets for e in bucket]
    assert [e.names for e in flat] == [
        ("embed.weight", "head.weight"),
        ("hidden.weight",),
        ("hidden.bias",),
    ]
    assert [[e.names[0] for e in b] for b in buckets] == [
        ["embed.weight"],  # larger than a bucket: alone
        ["hidden.weight", "hidden.bias"],
    ]
    assert sum(e.nbytes for e in buckets[1]) <= 512
    walked = [e.value() for bucket in iter_buckets(buckets, zero_stage=2) for e in bucket]
    assert walked[0] is not None and walked[0].data_ptr() == model.embed.weight.data_ptr()
