"""Student and teacher must share a tokenizer: same vocabulary, same ids
(docs/design.md#tokens-and-the-tokenizer-check).

Each server publishes `tokenizer_fingerprint` in `GET /v1/info`; workers compare them at
start-up with `check_compatible` and refuse to run on a mismatch, naming what differs.

An OpenAI-compatible teacher (`vllm serve`) does not publish its vocabulary, only a way to
tokenise text (`POST /tokenize`, with the token strings). So every server also publishes
`tokenizer_probe`, the hash of the ids and token strings of one fixed text, `PROBE_TEXT`,
which the teacher client computes the same way from what `/tokenize` answers: where one
side has no fingerprint, the probes are compared. A probe sees only the tokens that text
splits into (its characters, words and common special-token strings), so it catches a
tokenizer of another family, not every difference a full fingerprint would.
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


# Words, digits, whitespace runs, accents, CJK, emoji, code, and the special-token strings
# of the common reasoning-model families: what a tokenizer of another family splits
# differently.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=<>()[]{} 3.14159 -42\n"
    "  indented\ttabbed\n\nKnights and Knaves: A says 'B is a knave'. Élève, naïve, straße; "
    "Ωμέγα; Привет; 你好，世界; こんにちは; 안녕하세요; 🙂🚀\n"
    "def f(x):\n    return x ** 2  # comment\n\\boxed{\\frac{1}{2}}\n"
    "<think>reasoning</think><answer>42</answer>"
    "<|endoftext|><|im_start|>user<|im_end|><|begin_of_text|><|eot_id|></s><s>[INST]"
)


def probe_digest(token_ids: list[int], token_strs: list[str]) -> str:
    """sha256 of the ids and token strings `PROBE_TEXT` splits into."""
    payload = json.dumps({"ids": token_ids, "tokens": token_strs}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenizer_probe(tokenizer: Any) -> str:
    """`probe_digest` of `PROBE_TEXT` as `tokenizer` splits it, without added special
    tokens (as vLLM's `/tokenize` does with `add_special_tokens: false`)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return probe_digest(list(ids), list(tokenizer.convert_ids_to_tokens(ids)))


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
) -> str | None:
    """Raise `TokenizerMismatch` unless both servers tokenise identically, as far as what
    they publish shows; return a warning when it does not show enough to tell.

    Both fingerprints are compared when both servers publish one, else the probes (an
    OpenAI-compatible teacher). With the two tokenizers at hand (e.g. loaded from the
    model paths) the error names the ids that differ; otherwise the two hashes.
    """
    if student.tokenizer_fingerprint is not None and teacher.tokenizer_fingerprint is not None:
        if student.tokenizer_fingerprint == teacher.tokenizer_fingerprint:
            return None
        what = "fingerprints"
        hashes = (student.tokenizer_fingerprint, teacher.tokenizer_fingerprint)
    elif student.tokenizer_probe is not None and teacher.tokenizer_probe is not None:
        if student.tokenizer_probe == teacher.tokenizer_probe:
            return None
        what = "splits of the probe text"
        hashes = (student.tokenizer_probe, teacher.tokenizer_probe)
    else:
        missing = [
            f"{role} {info.model!r} ({info.backend})"
            for role, info in (("student", student), ("teacher", teacher))
            if info.tokenizer_probe is None
        ]
        return (
            "cannot check that the student and the teacher share a tokenizer: the teacher "
            "publishes no vocabulary fingerprint, and no probe of its tokenizer came from "
            f"{' nor '.join(missing)} (an OpenAI-compatible teacher needs vLLM's POST /tokenize; "
            "an rlad server of an older version publishes no probe). Scores are wrong if the "
            "two tokenise differently: make sure the teacher is of the student's model family."
        )
    where = (
        vocab_difference(student_tokenizer, teacher_tokenizer)
        if student_tokenizer is not None and teacher_tokenizer is not None
        else f"{what} {hashes[0]} vs {hashes[1]}"
    )
    raise TokenizerMismatch(
        f"student {student.model!r} and teacher {teacher.model!r} use different tokenizers "
        f"({where}). Token ids are compared directly, so both must share one vocabulary: "
        "pick a teacher from the student's model family."
    )
