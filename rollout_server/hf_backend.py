"""Transformers backend: `model.generate` in a worker thread, for machines without vLLM.

Prompts are left-padded and batched (those with the same token budget share one call);
`output_scores` gives the logits after temperature and top-k/top-p, whose log-softmax is
the sampling logprob (the same quantity vLLM's `processed_logprobs` returns). A weight
update loads into a copy of the model, probes the copy, and only then swaps it in, so a
rejected update never touches the model that serves.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rollout_server.staging import StagedWeights
from rollout_server.versioned import VersionedEngine
from services.common.logprobs import selective_log_softmax, sequence_logprobs
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
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Cancelled(StoppingCriteria):
    """Stops every row once the event is set (an update with in_flight_policy='abort')."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class HFRolloutEngine(VersionedEngine):
    backend = "hf"

    def __init__(self, config: RolloutServerConfig) -> None:
        facts = describe_model(config.model, config.max_model_len)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if config.device == "auto"
            else config.device
        )
        dtype = TORCH_DTYPES.get(config.dtype, "auto")
        model: Any = AutoModelForCausalLM.from_pretrained(facts.path, dtype=dtype)
        self.model: Any = model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(facts.path)
        super().__init__(config, facts, tokenizer)
        self.stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._model_lock = threading.Lock()  # one generate (or swap) on the model at a time
        self._cancel_events: set[threading.Event] = set()
        torch.manual_seed(config.seed)
        log.info("hf engine ready: %s on %s", config.model, self.device)

    async def _sample(
        self, prompts: list[list[int]], budgets: list[int], sampling: SamplingParams
    ) -> list[PromptCompletions]:
        cancel = threading.Event()
        self._cancel_events.add(cancel)
        try:
            return await asyncio.to_thread(
                self._sample_blocking, prompts, budgets, sampling, cancel
            )
        finally:
            self._cancel_events.discard(cancel)

    def _sample_blocking(
        self,
        prompts: list[list[int]],
        budgets: list[int],
        sampling: SamplingParams,
        cancel: threading.Event,
    ) -> list[PromptCompletions]:
        results: dict[int, PromptCompletions] = {}
        with self._model_lock, torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for budget in sorted(set(budgets)):
                indices = [i for i, b in enumerate(budgets) if b == budget]
                batch = [prompts[i] for i in indices]
                generated = self._generate_batch(batch, budget, sampling, cancel)
                results.update(zip(indices, generated, strict=True))
        return [results[i] for i in range(len(prompts))]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        budget: int,
        sampling: SamplingParams,
        cancel: threading.Event,
    ) -> list[PromptCompletions]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at `width`
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        stop_ids = sorted(set(self.stop_ids) | set(sampling.stop_token_ids))
        do_sample = sampling.temperature > 0
        # A fresh config, so the checkpoint's generation defaults (top_k=50 ...) never apply.
        generation_config = GenerationConfig(
            max_new_tokens=budget,
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_p=sampling.top_p if do_sample else None,
            top_k=(sampling.top_k if sampling.top_k > 0 else 0) if do_sample else None,
            num_return_sequences=sampling.n,
            eos_token_id=stop_ids or None,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=generation_config,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
        )
        generated = output.sequences[:, width:].cpu()  # [rows * n, steps]
        scores = torch.stack(output.scores, dim=1).cpu()  # [rows * n, steps, vocab] processed
        logprobs = selective_log_softmax(scores, generated)  # -inf only where never sampled
        stops = set(stop_ids)
        results = []
        for row, prompt in enumerate(prompts):
            completions = []
            for k in range(row * sampling.n, (row + 1) * sampling.n):
                ids = generated[k].tolist()
                end = next((j + 1 for j, t in enumerate(ids) if t in stops), None)
                reason: FinishReason
                if end is not None:
                    reason = "stop"
                elif len(ids) >= budget:
                    reason, end = "length", len(ids)
                else:
                    reason, end = "abort", len(ids)
                completions.append(
                    Completion(
                        token_ids=ids[:end],
                        logprobs=logprobs[k, :end].tolist(),
                        finish_reason=reason,
                    )
                )
            results.append(PromptCompletions(prompt_token_ids=prompt, completions=completions))
        return results

    async def _abort_in_flight(self) -> None:
        for event in list(self._cancel_events):
            event.set()

    async def _swap_in(self, staged: StagedWeights, probe: WeightProbe | None) -> float | None:
        return await asyncio.to_thread(self._swap_blocking, staged, probe)

    def _swap_blocking(self, staged: StagedWeights, probe: WeightProbe | None) -> float | None:
        state: dict[str, torch.Tensor] = {}
        for path in staged.files():
            state.update(load_file(str(path)))
        candidate = self.copy_model()
        candidate.load_state_dict(state, strict=True)  # casts to the serving dtype
        return self.probe_and_swap(candidate, probe)

    def copy_model(self) -> Any:
        """A copy of the serving model to load an update into (the served one stays)."""
        return copy.deepcopy(self.model)

    def probe_and_swap(self, candidate: Any, probe: WeightProbe | None) -> float | None:
        """Serve `candidate` once it passes the probe (max |diff|), or without one scores
        finite logprobs on the server's own; otherwise 422 and the model that served keeps
        serving."""
        ids = torch.tensor([self.probe_ids(probe)], device=self.device)
        with torch.no_grad():
            served, _ = sequence_logprobs(candidate, ids, torch.ones_like(ids))
        probe_diff = self.check_served(probe, served[0].float().tolist())
        with self._model_lock:
            self.model = candidate
        return probe_diff

    def _close(self) -> None:
        with self._model_lock:
            del self.model
