"""Transformers backend: batched forward passes with the trainer's logprob function.

Sequences are sorted by length and padded up to a multiple of `length_bucket` (shorter
ones to a power of two); only sequences of the same padded length share a forward pass,
and a pass holds at most `max_batch_tokens` padded tokens, so little compute goes to
padding and memory is bounded. Logprobs come from `services.common.logprobs` so that
teacher and trainer agree to the last bit on the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from services.common.logprobs import selective_log_softmax, sequence_logprobs
from services.common.model_files import describe_model
from services.common.protocol import ScoreSequence, SequenceScores
from services.config.servers import TeacherServerConfig
from teacher_server.teacher_engine import EngineBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_length(length: int, bucket: int, max_len: int) -> int:
    """The length a sequence is padded to: the next multiple of `bucket` (never past
    `max_len`), or below one bucket the next power of two, so that a short sequence does
    not cost a whole bucket."""
    if length < bucket:
        return min(1 << (length - 1).bit_length(), bucket)
    return min(-(-length // bucket) * bucket, max(max_len, length))


def plan_micro_batches(
    lengths: Sequence[int], bucket: int, max_tokens: int, max_len: int
) -> Iterator[tuple[list[int], int]]:
    """Group sequence indices into `(indices, padded_len)` forward passes.

    Shortest first; a pass only mixes lengths of the same `padded_length`, and rows x
    padded_len stays within `max_tokens` (one over-long sequence still gets a pass of its
    own).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    batch_len = 0
    for i in order:
        padded = padded_length(lengths[i], bucket, max_len)
        if batch and (padded != batch_len or (len(batch) + 1) * padded > max_tokens):
            yield batch, batch_len
            batch = []
        batch.append(i)
        batch_len = padded
    if batch:
        yield batch, batch_len


class HFTeacherEngine(EngineBase):
    def __init__(self, config: TeacherServerConfig) -> None:
        facts = describe_model(config.model, config.max_model_len)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = DTYPES.get(config.dtype, "auto")
        model: Any = AutoModelForCausalLM.from_pretrained(facts.path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.max_len = facts.max_model_len
        super().__init__(
            config,
            # `auto` kept the checkpoint's dtype (transformers reads it from config.json).
            facts.server_info("teacher", "hf", config.model, self.model.dtype),
        )
        log.info("hf engine ready: %s on %s, %s", config.model, self.device, self.model.dtype)

    def padded_length(self, length: int) -> int:
        return padded_length(length, self.config.length_bucket, self.max_len)

    def score_sequences(
        self, sequences: Sequence[ScoreSequence], top_k: int
    ) -> list[SequenceScores]:
        results: list[SequenceScores | None] = [None] * len(sequences)
        lengths = [len(seq.token_ids) for seq in sequences]
        plan = plan_micro_batches(
            lengths, self.config.length_bucket, self.config.max_batch_tokens, self.max_len
        )
        with torch.inference_mode():
            for indices, padded_len in plan:
                batch = [sequences[i] for i in indices]
                for i, scores in zip(indices, self._forward(batch, padded_len, top_k), strict=True):
                    results[i] = scores
        return [r for r in results if r is not None]

    def _forward(
        self, batch: list[ScoreSequence], padded_len: int, top_k: int
    ) -> list[SequenceScores]:
        input_ids = torch.zeros((len(batch), padded_len), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), padded_len), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq.token_ids)] = torch.tensor(seq.token_ids)
            attention_mask[row, : len(seq.token_ids)] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if top_k == 0:
            # [batch, padded_len - 1]: position t holds log p(token t+1 | tokens <= t)
            logprobs, _ = sequence_logprobs(self.model, input_ids, attention_mask)
            logits = None
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            logprobs = selective_log_softmax(logits, input_ids[:, 1:])
        logprobs = logprobs.float().cpu()
        out = []
        for row, seq in enumerate(batch):
            scored = slice(seq.start - 1, len(seq.token_ids) - 1)
            scores = SequenceScores(logprobs=logprobs[row, scored].tolist())
            if logits is not None:
                rows = logits[row, scored].float()  # [n_scored, vocab]
                values, ids = rows.topk(top_k, dim=-1)
                scores.top_k_ids = ids.cpu().tolist()
                scores.top_k_logprobs = (values - rows.logsumexp(-1, keepdim=True)).cpu().tolist()
            out.append(scores)
        return out
