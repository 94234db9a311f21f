"""vLLM backend: the async engine samples; weights reload in place from a staged folder.

Sampling logprobs come from `logprobs_mode="processed_logprobs"`: after temperature and
top-k/top-p, i.e. under the distribution the token was drawn from (vLLM's default,
`raw_logprobs`, would ignore the temperature).

Weight updates use the worker's `reload_weights(weights_path=folder)`, which re-runs the
CPU build's weight repacking (plain `load_weights` fails there) and is exact when the
folder carries every tensor, `lm_head.weight` of tied models included
(docs/platform-notes.md#weight-reload-and-tied-embeddings; `staging.verify_staged`
guarantees both). The prefix cache is reset after each load, or
cached KV from the old weights would leak into new requests. A load whose probe fails is
rolled back by reloading the folder that served before. Scripts that create this engine
need the `if __name__ == "__main__":` guard (vLLM spawns its engine core).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from rollout_server.staging import StagedWeights
from rollout_server.versioned import VersionedEngine
from services.common.http_server import ApiError
from services.common.model_files import describe_model
from services.common.protocol import (
    Completion,
    FinishReason,
    PromptCompletions,
    SamplingParams,
    WeightProbe,
)
from services.config.servers import RolloutServerConfig

log = logging.getLogger(__name__)
FINISH_REASONS: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


def _logprob(entry: Mapping[int, Any] | None, token_id: int) -> float:
    assert entry is not None, "vLLM returned no logprobs for a position"
    return float(entry[token_id].logprob)


class VLLMRolloutEngine(VersionedEngine):
    backend = "vllm"

    def __init__(self, config: RolloutServerConfig) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        facts = describe_model(config.model, config.max_model_len)
        extra: dict[str, Any] = {}
        if config.kv_cache_bytes is not None:
            extra["kv_cache_memory_bytes"] = config.kv_cache_bytes
        if config.nccl_weight_transfer:
            from vllm.config.weight_transfer import WeightTransferConfig

            if not torch.cuda.is_available():
                raise RuntimeError("nccl_weight_transfer needs CUDA GPUs; use file or HTTP updates")

            extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        if not torch.cuda.is_available():
            # vLLM rewinds a seeded request's generator after a partial (chunked) prefill,
            # which the CPU generator cannot do: the engine dies with "CPU Generator does
            # not use offset" once a batch of seeded prompts exceeds max_num_batched_tokens.
            # Whole-prompt prefills only on the CPU.
            extra["enable_chunked_prefill"] = False
        args = AsyncEngineArgs(
            model=str(facts.path),
            dtype=config.dtype,
            max_model_len=facts.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **extra,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        super().__init__(config, facts, AutoTokenizer.from_pretrained(facts.path))
        self._running: set[str] = set()
        log.info("vllm engine ready: %s", config.model)

    # ------------------------------------------------------------ sampling

    async def _sample(
        self, prompts: list[list[int]], budgets: list[int], sampling: SamplingParams
    ) -> list[PromptCompletions]:
        return list(
            await asyncio.gather(
                *(
                    self._sample_one(prompt, budget, sampling, i)
                    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True))
                )
            )
        )

    async def _sample_one(
        self, prompt: list[int], budget: int, sampling: SamplingParams, index: int
    ) -> PromptCompletions:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VLLMSamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=budget,
            stop_token_ids=list(sampling.stop_token_ids),
            # One seed per prompt: the same request reproduces, prompts stay independent.
            seed=None if sampling.seed is None else sampling.seed + index,
            logprobs=0,
            detokenize=False,
            # All n completions in one final output (streaming mode yields one child at a time).
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = uuid.uuid4().hex
        self._running.add(request_id)
        final = None
        try:
            async for output in self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt), params, request_id
            ):
                final = output
        finally:
            self._running.discard(request_id)
        assert final is not None
        completions = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            ids = list(out.token_ids)
            entries = out.logprobs or []
            completions.append(
                Completion(
                    token_ids=ids,
                    logprobs=[_logprob(entry, t) for entry, t in zip(entries, ids, strict=True)],
                    finish_reason=FINISH_REASONS.get(out.finish_reason, "abort"),
                )
            )
        return PromptCompletions(prompt_token_ids=prompt, completions=completions)

    async def _abort_in_flight(self) -> None:
        await self.llm.abort(list(self._running))

    # ------------------------------------------------------------ weights

    async def score(self, token_ids: list[int]) -> list[float]:
        """Logprob of `token_ids[1:]` under the loaded weights (temperature 1)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        params = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        final = None
        async for output in self.llm.generate(
            TokensPrompt(prompt_token_ids=token_ids), params, uuid.uuid4().hex
        ):
            final = output
        assert final is not None and final.prompt_logprobs is not None
        positions = zip(final.prompt_logprobs[1:], token_ids[1:], strict=True)
        return [_logprob(entry, t) for entry, t in positions]

    async def _reload(self, folder: str) -> None:
        await self.llm.collective_rpc(
            "reload_weights",
            timeout=self.config.update_timeout_s,
            kwargs={"weights_path": folder},
        )
        if not await self.llm.reset_prefix_cache():
            raise RuntimeError("prefix cache reset refused: requests still running")

    async def _swap_in(self, staged: StagedWeights, probe: WeightProbe | None) -> float | None:
        try:
            await self._reload(str(staged.folder))
            return self.check_served(probe, await self.score(self.probe_ids(probe)))
        except BaseException as exc:
            error = await self.restore_after(exc)
            if error is exc:
                raise
            raise error from exc

    async def restore_after(self, exc: BaseException) -> ApiError:
        """Reload the weights that served before a failed update; the error to answer."""
        log.warning("update rejected (%s); restoring %s", exc, self.serving_dir)
        try:
            if self.serving_dir is None:
                raise RuntimeError("the serving weights came over NCCL and have no copy on disk")
            await self._reload(str(self.serving_dir))
        except Exception as restore_exc:  # the engine is now in an unknown state
            self.broken = (
                f"a failed update could not be undone ({restore_exc}); push a full update "
                "over HTTP or file to serve again"
            )
            return ApiError(
                500,
                "restore_failed",
                f"loading the update failed ({exc}) and restoring the previous weights "
                f"failed too ({restore_exc}); push a full update over HTTP or file, or restart",
            )
        if isinstance(exc, ApiError):
            return exc
        return ApiError(
            500, "load_failed", f"loading the update failed: {exc}; the old weights serve"
        )

    def _close(self) -> None:
        self.llm.shutdown()
        # Let the engine go now: its __del__ shuts down once more, which raises (a printed
        # traceback at every exit) if it waits for interpreter teardown to clear vLLM's globals.
        del self.llm
