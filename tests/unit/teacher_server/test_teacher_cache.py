"""The byte-bounded LRU logprob cache."""

from __future__ import annotations

from services.common.protocol import ScoreSequence, SequenceScores
from teacher_server.cache import ENTRY_OVERHEAD_BYTES, LogprobCache, cache_key


def _seq(*ids: int, start: int = 1) -> ScoreSequence:
    return ScoreSequence(token_ids=list(ids), start=start)


def _scores(n: int, k: int = 0) -> SequenceScores:
    logprobs = [-0.1 * (i + 1) for i in range(n)]
    if not k:
        return SequenceScores(logprobs=logprobs)
    return SequenceScores(
        logprobs=logprobs,
        top_k_ids=[list(range(k)) for _ in range(n)],
        top_k_logprobs=[[-1.0 - j for j in range(k)] for _ in range(n)],
    )


def test_hit_returns_the_float32_values_that_were_stored() -> None:
    cache = LogprobCache(1 << 20)
    key = cache_key("rev", _seq(1, 2, 3, 4), 2)
    stored = _scores(3, k=2)
    cache.put(key, stored)
    hit = cache.get(key)
    assert hit is not None
    assert hit.top_k_ids == stored.top_k_ids
    # float32 storage: -0.1 comes back as the nearest float32, within 1e-7
    assert all(abs(a - b) < 1e-7 for a, b in zip(hit.logprobs, stored.logprobs, strict=True))
    # a second hit is bit-identical to the first
    assert cache.get(key) == hit


def test_key_separates_revision_tokens_start_and_top_k() -> None:
    cache = LogprobCache(1 << 20)
    cache.put(cache_key("rev", _seq(1, 2, 3), 0), _scores(2))
    assert cache.get(cache_key("other", _seq(1, 2, 3), 0)) is None
    assert cache.get(cache_key("rev", _seq(1, 2, 4), 0)) is None
    assert cache.get(cache_key("rev", _seq(1, 2, 3, start=2), 0)) is None
    assert cache.get(cache_key("rev", _seq(1, 2, 3), 1)) is None
    assert cache.get(cache_key("rev", _seq(1, 2, 3), 0)) is not None


def test_least_recently_used_entry_is_evicted_and_bytes_stay_bounded() -> None:
    # each entry: overhead + 3 revision bytes + 4*4 token bytes + 3*4 logprob bytes
    entry = ENTRY_OVERHEAD_BYTES + 3 + 16 + 12
    cache = LogprobCache(2 * entry + 10)  # room for two entries, not three
    keys = [cache_key("rev", _seq(i, 1, 2, 3), 0) for i in range(3)]
    cache.put(keys[0], _scores(3))
    cache.put(keys[1], _scores(3))
    assert cache.bytes == 2 * entry
    assert cache.get(keys[0]) is not None  # keys[0] is now the most recent
    cache.put(keys[2], _scores(3))
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert len(cache) == 2 and cache.bytes == 2 * entry <= cache.max_bytes


def test_disabled_or_oversized_entries_are_not_stored() -> None:
    off = LogprobCache(0)
    off.put(cache_key("rev", _seq(1, 2), 0), _scores(1))
    assert len(off) == 0 and off.bytes == 0
    small = LogprobCache(ENTRY_OVERHEAD_BYTES + 100)
    small.put(cache_key("rev", _seq(*range(50)), 0), _scores(49))
    assert len(small) == 0


def test_replacing_a_key_does_not_double_count() -> None:
    cache = LogprobCache(1 << 20)
    key = cache_key("rev", _seq(1, 2, 3), 0)
    cache.put(key, _scores(2))
    before = cache.bytes
    cache.put(key, _scores(2))
    assert cache.bytes == before and len(cache) == 1
