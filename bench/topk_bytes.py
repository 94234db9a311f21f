"""What the teacher's top-k costs on the queue: bytes of one scored group, measured.

A realistic group, 8 completions × 160 tokens (the default rollout.group_size and
rollout.max_tokens), scored with `scorer.top_k` 0, 8 and 32 and encoded as the queue
stores it (`services.common.wire`: ids int32, logprobs float16, packed), beside the same
top-k as nested rows through the same codec (each row an int32 and a float32 array: the
form `SequenceScores` has on the teacher's wire). Also the time to decode and validate one
group, as the trainer's intake does.

    python bench/topk_bytes.py [--quick] [--vocab 151936]

Each position's top-k is that of a random softmax over 1,024 candidate ids of the
vocabulary (logits with a spread of 3 nats), so the values are as varied as a teacher's;
msgpack does not compress, so only their count and width matter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from services.common import wire
from services.common.protocol import CompletionRecord, RolloutGroup, SequenceScores, TeacherTopK

GROUP_SIZE, TOKENS, CANDIDATES = 8, 160, 1024


def teacher_rows(
    rng: np.random.Generator, k: int, vocab: int
) -> tuple[list[list[int]], list[list[float]]]:
    """[TOKENS][k] ids and logprobs, best first, as the teacher answers them."""
    logits = 3.0 * rng.standard_normal((TOKENS, CANDIDATES))
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logprobs, axis=1)[:, :k]
    candidates = rng.choice(vocab, size=CANDIDATES, replace=False)
    ids = candidates[order]
    top = np.take_along_axis(logprobs, order, axis=1).astype(np.float32)
    return ids.tolist(), top.astype(float).tolist()


def scored_group(rng: np.random.Generator, k: int, vocab: int) -> RolloutGroup:
    """A scored group, with the teacher's top-k `k` at every token (0: none)."""
    completions = []
    for _ in range(GROUP_SIZE):
        record = CompletionRecord(
            token_ids=rng.integers(0, vocab, TOKENS).tolist(),
            rollout_logprobs=(-rng.exponential(1.0, TOKENS)).tolist(),
            teacher_logprobs=(-rng.exponential(1.0, TOKENS)).tolist(),
            reward=1.0,
            correct=True,
            finish_reason="stop",
        )
        if k:
            ids, logprobs = teacher_rows(rng, k, vocab)
            record.teacher_top_k = TeacherTopK.from_rows(ids, logprobs, k)
        completions.append(record)
    return RolloutGroup(
        group_id="g",
        prompt_id="p",
        task="kk",
        policy_version=0,
        prompt_token_ids=rng.integers(0, vocab, 200).tolist(),
        completions=completions,
        teacher_revision="0123456789abcdef",
    )


def nested_top_k_bytes(rng: np.random.Generator, k: int, vocab: int) -> int:
    """Bytes the top-k rows of a group take as nested rows through the wire codec, as the
    teacher sends them (`SequenceScores` without its logprobs)."""
    total = 0
    for _ in range(GROUP_SIZE):
        ids, logprobs = teacher_rows(rng, k, vocab)
        scores = SequenceScores(logprobs=[], top_k_ids=ids, top_k_logprobs=logprobs)
        total += len(wire.encode(scores))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode repetitions")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen3)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 30
    rng = np.random.default_rng(0)
    print(f"one scored group: {GROUP_SIZE} completions x {TOKENS} tokens, vocab {args.vocab}")
    sizes = {}
    for k in (0, 8, 32):
        group = scored_group(rng, k, args.vocab)
        body = wire.encode(group)
        started = time.perf_counter()
        for _ in range(repeats):
            wire.decode(body, RolloutGroup)
        decode_ms = (time.perf_counter() - started) / repeats * 1000
        sizes[k] = len(body)
        print(f"scored_group_bytes_top_k_{k}: {len(body)}")
        print(f"scored_group_decode_ms_top_k_{k}: {decode_ms:.2f}")
    for k in (8, 32):
        per_entry = (sizes[k] - sizes[0]) / (GROUP_SIZE * TOKENS * k)
        nested = nested_top_k_bytes(rng, k, args.vocab)
        print(f"top_k_{k}_bytes_per_entry: {per_entry:.2f}")
        print(f"top_k_{k}_nested_rows_bytes: {nested}")
        print(f"top_k_{k}_nested_vs_packed_ratio: {nested / (sizes[k] - sizes[0]):.2f}")


if __name__ == "__main__":
    main()
