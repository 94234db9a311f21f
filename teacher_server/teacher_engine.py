"""The teacher engine interface, shared by the vLLM and transformers backends.

An engine is a plain Python object usable in-process (tests, benchmarks) and behind the
HTTP app. Its methods are synchronous and block while the model runs: the app calls them
from a worker thread, never on the event loop.

    engine = load_engine(TeacherServerConfig(model="path/to/teacher", backend="hf"))
    response = engine.score(ScoreRequest(sequences=[ScoreSequence(token_ids=ids, start=5)]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.common.http_server import ApiError
from services.common.protocol import (
    TOP_K_OVER_LIMIT,
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    SequenceScores,
    ServerInfo,
)
from services.config.servers import TeacherServerConfig


class TeacherEngine(Protocol):
    def info(self) -> ServerInfo:
        """Model id, weights revision, vocab size, tokenizer fingerprint, max length."""
        ...

    def score_sequences(
        self, sequences: Sequence[ScoreSequence], top_k: int
    ) -> list[SequenceScores]:
        """Logprobs of tokens `start..len-1` of each (already validated) sequence. Blocking."""
        ...

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Validate and score a whole request in one call. Blocking."""
        ...

    def cost(self, sequences: Sequence[ScoreSequence], top_k: int) -> int:
        """The work scoring `sequences` takes, in tokens: as the engine runs them (padding
        included) plus the top-k entries it returns. What admission counts."""
        ...

    def close(self) -> None:
        """Release the model (and any engine processes)."""
        ...


class EngineBase:
    """`info`, validation and `score` on top of a backend's `score_sequences`."""

    def __init__(self, config: TeacherServerConfig, server_info: ServerInfo) -> None:
        self.config = config
        self.server_info = server_info

    def info(self) -> ServerInfo:
        return self.server_info

    def score_sequences(
        self, sequences: Sequence[ScoreSequence], top_k: int
    ) -> list[SequenceScores]:
        raise NotImplementedError

    def padded_length(self, length: int) -> int:
        """Tokens the engine runs for a sequence of `length` (a padding backend says more)."""
        return length

    def cost(self, sequences: Sequence[ScoreSequence], top_k: int) -> int:
        # A top-k entry (an id and a logprob) weighs at least what a scored token does in
        # the response and in the memory that holds it (about 23 bytes of JSON each): top_k
        # 64 made a 264 KB request answer 96 MB, so each entry counts as a token.
        tokens = sum(self.padded_length(len(seq.token_ids)) for seq in sequences)
        return tokens + top_k * sum(len(seq.token_ids) - seq.start for seq in sequences)

    def score(self, request: ScoreRequest) -> ScoreResponse:
        validate_request(request, self.server_info, self.config)
        return ScoreResponse(
            model=self.server_info.model,
            revision=self.server_info.revision,
            scores=self.score_sequences(request.sequences, request.top_k),
        )

    def close(self) -> None:
        return None


def validate_request(request: ScoreRequest, info: ServerInfo, config: TeacherServerConfig) -> None:
    """Refuse what the model cannot score, naming the offending sequence and token.

    The schema already refuses empty lists and a `start` outside the sequence; this adds
    what depends on the loaded model: token ids inside the vocabulary, lengths within
    `max_model_len`, and the per-request token and top-k limits.
    """
    if request.top_k > config.max_top_k:
        raise ApiError(
            422,
            TOP_K_OVER_LIMIT,
            f"top_k={request.top_k} exceeds this server's max_top_k ({config.max_top_k}): "
            "lower the scorer's scorer.top_k, or raise this server's --max-top-k",
        )
    total = sum(len(seq.token_ids) for seq in request.sequences)
    if total > config.max_request_tokens:
        raise ApiError(
            413,
            "too_large",
            f"request carries {total} tokens in {len(request.sequences)} sequences, over the "
            f"limit of {config.max_request_tokens}; split it into smaller requests",
        )
    vocab_size = info.vocab_size
    assert vocab_size is not None, "a teacher engine reads its vocabulary size from the model"
    for index, seq in enumerate(request.sequences):
        if len(seq.token_ids) > info.max_model_len:
            raise ApiError(
                422,
                "invalid_request",
                f"sequences[{index}] has {len(seq.token_ids)} tokens, over max_model_len "
                f"{info.max_model_len}",
                detail=[{"loc": ["sequences", str(index), "token_ids"], "msg": "too long"}],
            )
        ids = seq.token_ids
        if ids and min(ids) >= 0 and max(ids) < vocab_size:
            continue
        outside = [pos for pos, token in enumerate(ids) if not 0 <= token < vocab_size]
        pos = outside[0]
        raise ApiError(
            422,
            "invalid_request",
            f"sequences[{index}].token_ids[{pos}] = {ids[pos]} is outside the vocabulary "
            f"(0..{vocab_size - 1}); {len(outside)} such ids in this sequence",
            detail=[
                {"loc": ["sequences", str(index), "token_ids", str(pos)], "msg": "not in vocab"}
            ],
        )
