"""vLLM backend: `prompt_logprobs` of a one-token generation scores every prompt token.

vLLM returns, for each prompt position after the first, the logprob of the actual token
plus the `top_k` most likely ones (with their rank), from the raw logits. The engine is
created without a tokenizer: token ids go in, token ids come out, and ids between the
tokenizer's size and the embedding size stay scorable. Scripts that create this engine
need the `if __name__ == "__main__":` guard (vLLM spawns its engine core).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from services.common.model_files import describe_model
from services.common.protocol import ScoreSequence, SequenceScores
from services.config.servers import TeacherServerConfig
from teacher_server.teacher_engine import EngineBase

log = logging.getLogger(__name__)


def position_scores(
    entries: Mapping[int, Any], actual_id: int, top_k: int
) -> tuple[float, list[int], list[float]]:
    """(logprob of `actual_id`, top-k ids, top-k logprobs) from one prompt_logprobs dict.

    The dict holds the actual token plus the top-k (k+1 entries when the actual token is
    not among the k most likely); each entry has `.logprob` and a 1-based `.rank`.
    """
    actual = float(entries[actual_id].logprob)
    ranked = sorted(
        ((e.rank, tid, float(e.logprob)) for tid, e in entries.items() if e.rank <= top_k),
        key=lambda item: item[0],
    )[:top_k]
    return actual, [tid for _, tid, _ in ranked], [lp for _, _, lp in ranked]


class VLLMTeacherEngine(EngineBase):
    def __init__(self, config: TeacherServerConfig) -> None:
        from vllm import LLM

        facts = describe_model(config.model, config.max_model_len)
        self.llm = LLM(
            model=str(facts.path),
            dtype=config.dtype,
            max_model_len=facts.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            skip_tokenizer_init=True,
            # Cached prefixes are not recomputed, so they would have no prompt logprobs.
            enable_prefix_caching=False,
            max_logprobs=max(config.max_top_k, 1),
            kv_cache_memory_bytes=config.kv_cache_bytes,
        )
        # vLLM resolves `auto` itself and serves a float32 checkpoint in its platform's half
        # precision (bfloat16 on x86 CPUs and recent GPUs): report what it chose.
        dtype = self.llm.model_config.dtype
        super().__init__(
            config,
            facts.server_info("teacher", "vllm", config.model, dtype),
        )
        log.info("vllm engine ready: %s in %s", config.model, dtype)

    def score_sequences(
        self, sequences: Sequence[ScoreSequence], top_k: int
    ) -> list[SequenceScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(seq.token_ids)) for seq in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for seq, output in zip(sequences, outputs, strict=True):
            per_position: Any = output.prompt_logprobs  # [len], entry 0 is None
            if per_position is None:
                raise RuntimeError("vLLM returned no prompt logprobs; is max_logprobs too low?")
            logprobs: list[float] = []
            top_ids: list[list[int]] = []
            top_lps: list[list[float]] = []
            for t in range(seq.start, len(seq.token_ids)):
                actual, ids, lps = position_scores(per_position[t], seq.token_ids[t], top_k)
                logprobs.append(actual)
                top_ids.append(ids)
                top_lps.append(lps)
            scores = SequenceScores(logprobs=logprobs)
            if top_k:
                scores.top_k_ids, scores.top_k_logprobs = top_ids, top_lps
            results.append(scores)
        return results

    def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
