"""What `rlad monitor` reads from the streams, without writing anything (it must not
create a stream or a consumer group that no process has yet). Every reading is `Steps`
(services/queue/runner.py); ages come from the millisecond part of entry ids, to be
compared with the Redis server's clock (`server_time_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from services.queue.keys import CONSUMER_GROUPS, DEAD, STREAMS, RunKeys
from services.queue.runner import Steps, command, text


@dataclass
class GroupProgress:
    stream: str
    group: str
    consumers: int
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int  # in the stream, not yet delivered to the group
    oldest_ms: int | None  # id time of the oldest entry the group has still to finish


@dataclass
class DeadLetterEntry:
    id: str
    source: str
    reason: str


def server_time_ms() -> Steps[int]:
    seconds, micros = yield command("time")
    return int(seconds) * 1000 + int(micros) // 1000


def stream_lengths(keys: RunKeys) -> Steps[dict[str, int]]:
    lengths = {}
    for stream in STREAMS:
        lengths[stream] = int((yield command("xlen", keys.stream(stream))))
    return lengths


def groups_progress(keys: RunKeys) -> Steps[list[GroupProgress]]:
    progress = []
    for stream, group in CONSUMER_GROUPS.items():
        progress.append((yield from group_progress(keys, stream, group)))
    return progress


def group_progress(keys: RunKeys, stream: str, group: str) -> Steps[GroupProgress]:
    key = keys.stream(stream)
    info = yield from _group_info(key, group)
    if info is None:  # no consumer has attached yet: everything in the stream is lag
        first = yield command("xrange", key, count=1)
        length = yield command("xlen", key)
        oldest = _id_ms(first[0][0]) if first else None
        return GroupProgress(stream, group, 0, 0, int(length), oldest)
    last = text(info["last-delivered-id"])
    undelivered = yield command("xrange", key, min=f"({last}", max="+", count=1)
    lag = info.get("lag")
    if lag is None:  # Redis < 7 has no lag field, and 7.x reports None after deletions
        lag = len((yield command("xrange", key, min=f"({last}", max="+")) or [])
    candidates = []
    if int(info["pending"]):
        # The entries may be acknowledged between XINFO and XPENDING; the summary's min is
        # then None, and no pending entry has an age.
        summary = yield command("xpending", key, group)
        if summary["min"] is not None:
            candidates.append(_id_ms(summary["min"]))
    if undelivered:
        candidates.append(_id_ms(undelivered[0][0]))
    oldest = min(candidates) if candidates else None
    return GroupProgress(
        stream, group, int(info["consumers"]), int(info["pending"]), int(lag), oldest
    )


def _group_info(key: str, group: str) -> Steps[dict[str, Any] | None]:
    try:
        rows = yield command("xinfo_groups", key)
    except redis.ResponseError:  # the stream does not exist yet
        return None
    return next((row for row in rows if text(row["name"]) == group), None)


def recent_dead(keys: RunKeys, count: int) -> Steps[list[DeadLetterEntry]]:
    """The newest dead letters first."""
    letters = []
    for entry_id, fields in (yield command("xrevrange", keys.stream(DEAD), count=count)) or []:
        described = {text(k): text(v) for k, v in (fields or {}).items() if k != b"data"}
        letters.append(
            DeadLetterEntry(
                text(entry_id), described.get("source", "?"), described.get("reason", "")
            )
        )
    return letters


def _id_ms(message_id: Any) -> int:
    return int(text(message_id).partition("-")[0])
