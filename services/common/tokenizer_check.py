"""Student and teacher must share a tokenizer: same vocabulary, same ids
(docs/design.md#tokens-and-the-tokenizer-check).

Each server publishes `tokenizer_fingerprint` in `GET /v1/info`; workers compare them at
start-up with `check_compatible` and refuse to run on a mismatch, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from services.common.protocol import ServerInfo


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the sorted (token, id) pairs plus the special-token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
    }
    payload = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def vocab_difference(student: Any, teacher: Any, limit: int = 5) -> str:
    """Human-readable list of the first ids whose tokens differ between two tokenizers."""
    s_vocab = {i: t for t, i in student.get_vocab().items()}
    t_vocab = {i: t for t, i in teacher.get_vocab().items()}
    diffs = [
        f"id {i}: student {s_vocab.get(i)!r} vs teacher {t_vocab.get(i)!r}"
        for i in sorted(set(s_vocab) | set(t_vocab))
        if s_vocab.get(i) != t_vocab.get(i)
    ]
    if not diffs:
        return "vocabularies agree; special-token ids differ"
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


class TokenizerMismatch(RuntimeError):
    pass


def check_compatible(
    student: ServerInfo,
    teacher: ServerInfo,
    student_tokenizer: Any | None = None,
    teacher_tokenizer: Any | None = None,
) -> None:
    """Raise `TokenizerMismatch` unless both servers tokenise identically.

    With the two tokenizers at hand (e.g. loaded from the model paths) the error names
    the ids that differ; otherwise it names the fingerprints.
    """
    if student.tokenizer_fingerprint == teacher.tokenizer_fingerprint:
        return
    where = (
        vocab_difference(student_tokenizer, teacher_tokenizer)
        if student_tokenizer is not None and teacher_tokenizer is not None
        else f"fingerprints {student.tokenizer_fingerprint} vs {teacher.tokenizer_fingerprint}"
    )
    raise TokenizerMismatch(
        f"student {student.model!r} and teacher {teacher.model!r} use different tokenizers "
        f"({where}). Token ids are compared directly, so both must share one vocabulary: "
        "pick a teacher from the student's model family."
    )
