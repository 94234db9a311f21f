"""A least-recently-used cache of per-sequence scores, bounded in bytes.

Keyed by (weights revision, token ids, start, top_k) — the revision in the key means a
server whose weights changed can never answer from stale entries. Values are stored as
float32/int32 arrays (the precision the engines compute in), so a hit returns exactly the
values of the miss that filled it. The cache is per sequence, so a request whose
sequences are partly cached only sends the rest to the engine.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from services.common.protocol import ScoreSequence, SequenceScores

# Python object overhead of one entry (key tuple, dataclass, arrays' headers, dict slot):
# counted so that many tiny entries cannot exceed the budget unnoticed.
ENTRY_OVERHEAD_BYTES = 512

CacheKey = tuple[str, bytes, int, int]


@dataclass(frozen=True)
class _Entry:
    logprobs: np.ndarray  # [n_scored] float32
    top_k_ids: np.ndarray | None  # [n_scored, k] int32
    top_k_logprobs: np.ndarray | None  # [n_scored, k] float32
    nbytes: int

    def to_scores(self) -> SequenceScores:
        return SequenceScores(
            logprobs=self.logprobs.tolist(),
            top_k_ids=None if self.top_k_ids is None else self.top_k_ids.tolist(),
            top_k_logprobs=None if self.top_k_logprobs is None else self.top_k_logprobs.tolist(),
        )


def cache_key(revision: str, seq: ScoreSequence, top_k: int) -> CacheKey:
    return (revision, np.asarray(seq.token_ids, dtype=np.int32).tobytes(), seq.start, top_k)


class LogprobCache:
    """Thread-safe byte-bounded LRU; `max_bytes = 0` turns it into a no-op."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> SequenceScores | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        return entry.to_scores()

    def put(self, key: CacheKey, scores: SequenceScores) -> None:
        logprobs = np.asarray(scores.logprobs, dtype=np.float32)
        ids = None if scores.top_k_ids is None else np.asarray(scores.top_k_ids, dtype=np.int32)
        top = (
            None
            if scores.top_k_logprobs is None
            else np.asarray(scores.top_k_logprobs, dtype=np.float32)
        )
        nbytes = ENTRY_OVERHEAD_BYTES + len(key[1]) + len(key[0]) + logprobs.nbytes
        nbytes += (ids.nbytes if ids is not None else 0) + (top.nbytes if top is not None else 0)
        if nbytes > self.max_bytes:
            return  # larger than the whole budget (or the cache is off)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = _Entry(logprobs, ids, top, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
