"""`VersionedEngine`: what both backends share — validation, the version gate, and the
weight-update protocol. A backend adds sampling (`_sample`), loading plus probing
(`_swap_in`) and aborting (`_abort_in_flight`).

An update, whatever its transport:
1. refuse early: version not above the serving one (409), checksum or probe missing when
   required (422);
2. stage: receive or link the files into a fresh folder, hash them, check names, shapes,
   dtypes and checksums (`staging.verify_staged`); generation goes on meanwhile;
3. swap, under the gate's exclusive side: in-flight generations finish or are aborted,
   the backend loads the folder, resets caches and scores the probe; on any failure it
   restores the previous weights before raising;
4. commit: the version and revision change while still exclusive, so the first request
   let in afterwards already reports them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from rollout_server.gate import VersionGate
from rollout_server.rollout_engine import completion_budgets, generation_cost, resolve_prompts
from rollout_server.staging import (
    UPLOAD_FILE,
    StagedWeights,
    WeightSchema,
    file_sha256,
    link_or_copy,
    receive_upload,
    verify_staged,
)
from services.common.admission import Admission
from services.common.http_server import ApiError
from services.common.model_files import ModelFacts
from services.common.protocol import (
    GenerateRequest,
    GenerateResponse,
    PromptCompletions,
    SamplingParams,
    ServerInfo,
    WeightProbe,
    WeightUpdateRequest,
    WeightUpdateResponse,
)
from services.config.servers import RolloutServerConfig
from services.weights.probe import check_probe, probe_token_ids

log = logging.getLogger(__name__)
Transport = Literal["file", "http", "nccl", "cuda_ipc"]


class VersionedEngine:
    backend: Literal["vllm", "hf"]

    def __init__(self, config: RolloutServerConfig, facts: ModelFacts, tokenizer: Any) -> None:
        self.config = config
        self.facts = facts
        self.tokenizer = tokenizer
        self.gate = VersionGate(config.policy_version)
        self.admission = Admission(config.max_queue_tokens, "tokens")
        # Scored after every load that brings no probe: weights that load but compute NaN
        # or infinity never serve.
        self.own_probe_ids = probe_token_ids(facts.vocab_size, min(32, facts.max_model_len))
        self.revision = facts.revision
        self.schema = WeightSchema.from_model_dir(facts.path)
        self._owns_work_dir = config.work_dir is None
        self.work_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="rlad-rollout-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Where the serving weights can be reloaded from, to roll back a failed update;
        # None once they exist only in memory (after an NCCL update).
        self.serving_dir: Path | None = facts.path
        # Set when a failed update could not be undone: generation refuses (503) until a
        # full update succeeds, rather than serve weights no version describes.
        self.broken: str | None = None

    # ------------------------------------------------------------ backend hooks

    async def _sample(
        self, prompts: list[list[int]], budgets: list[int], sampling: SamplingParams
    ) -> list[PromptCompletions]:
        raise NotImplementedError

    async def _swap_in(self, staged: StagedWeights, probe: WeightProbe | None) -> float | None:
        """Load `staged`, reset caches, check the probe (max |diff|); restore on failure."""
        raise NotImplementedError

    async def _abort_in_flight(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ serving

    def info(self) -> ServerInfo:
        return ServerInfo(
            role="rollout",
            model=self.config.model,
            revision=self.revision,
            backend=self.backend,
            vocab_size=self.facts.vocab_size,
            tokenizer_fingerprint=self.facts.tokenizer_fingerprint,
            tokenizer_probe=self.facts.tokenizer_probe,
            max_model_len=self.facts.max_model_len,
            policy_version=self.gate.version,
        )

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        if self.broken is not None:
            raise ApiError(503, "weights_unverified", self.broken)
        prompts = resolve_prompts(request, self.tokenizer)
        budgets = completion_budgets(
            prompts,
            request.sampling,
            vocab_size=self.facts.vocab_size,
            max_model_len=self.facts.max_model_len,
            max_sequences=self.config.max_sequences_per_request,
        )
        cost = generation_cost(prompts, budgets, request.sampling.n)
        with self.admission.hold(cost):
            async with self.gate.reading() as version:
                results = await self._sample(prompts, budgets, request.sampling)
        if request.prompt_texts is not None:
            for result in results:
                for completion in result.completions:
                    completion.text = self.tokenizer.decode(
                        completion.token_ids, skip_special_tokens=True
                    )
        return GenerateResponse(policy_version=version, results=results)

    # ------------------------------------------------------------ weight updates

    def check_version(self, version: int) -> None:
        if version <= self.gate.version:
            raise ApiError(
                409,
                "stale_version",
                f"version {version} is not above the serving version "
                f"{self.gate.version}; send a larger one",
            )

    def _precheck(self, request: WeightUpdateRequest) -> None:
        self.check_version(request.version)
        if self.config.require_checksum and not request.sha256:
            raise ApiError(422, "checksum_required", "this server requires sha256 of the weights")
        if self.config.require_probe and request.probe is None:
            raise ApiError(422, "probe_required", "this server requires a probe with each update")
        if request.probe is not None:
            self._check_probe_ids(request.probe.token_ids)

    def _check_probe_ids(self, ids: list[int]) -> None:
        """A probe the model can score: ids in the vocabulary, no longer than the context."""
        vocab, longest = self.facts.vocab_size, self.facts.max_model_len
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise ApiError(
                422,
                "invalid_request",
                f"probe token ids {outside[:5]} are outside the vocab [0, {vocab})",
            )
        if len(ids) > longest:
            raise ApiError(
                422,
                "invalid_request",
                f"the probe has {len(ids)} tokens, over max_model_len {longest}",
            )

    def probe_ids(self, probe: WeightProbe | None) -> list[int]:
        """The tokens to score after loading: the sender's probe, or the server's own."""
        return probe.token_ids if probe is not None else self.own_probe_ids

    def check_served(self, probe: WeightProbe | None, served: list[float]) -> float | None:
        """Judge the loaded weights by the logprobs of `probe_ids(probe)`: the sender's
        probe must match (its max |diff|); without one, every logprob must be finite."""
        if probe is not None:
            return check_probe(probe, served)
        if not all(math.isfinite(x) for x in served):
            raise ApiError(
                422,
                "weights_not_finite",
                "the loaded weights score the server's probe sequence to NaN or infinity; "
                "the old weights keep serving",
            )
        return None

    def _new_staging_dir(self) -> Path:
        folder = self.work_dir / f"staging-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        return folder

    async def update_weights_from_path(self, request: WeightUpdateRequest) -> WeightUpdateResponse:
        started = time.perf_counter()
        self._precheck(request)
        if request.path is None:
            raise ApiError(422, "invalid_request", "give `path`: a safetensors file or folder")
        folder = self._new_staging_dir()
        try:
            files = await asyncio.to_thread(
                link_or_copy, request.path, self.config.weights_dir, folder
            )
            digests = await asyncio.gather(*(asyncio.to_thread(file_sha256, f) for f in files))
            received = {f.name: d for f, d in zip(files, digests, strict=True)}
            staged = await asyncio.to_thread(
                verify_staged, folder, self.schema, received, request.sha256
            )
            return await self._apply(staged, request, "file", started)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def update_weights_from_upload(
        self, chunks: AsyncIterator[bytes], request: WeightUpdateRequest
    ) -> WeightUpdateResponse:
        started = time.perf_counter()
        self._precheck(request)
        folder = self._new_staging_dir()
        try:
            _, digest = await receive_upload(
                chunks,
                folder,
                self.schema,
                max_bytes=min(self.config.max_weights_bytes, self.schema.max_file_bytes),
                idle_timeout_s=self.config.upload_idle_timeout_s,
            )
            staged = await asyncio.to_thread(
                verify_staged, folder, self.schema, {UPLOAD_FILE: digest}, request.sha256
            )
            return await self._apply(staged, request, "http", started)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def _apply(
        self,
        staged: StagedWeights,
        request: WeightUpdateRequest,
        transport: Transport,
        started: float,
    ) -> WeightUpdateResponse:
        abort = self._abort_in_flight if self.config.in_flight_policy == "abort" else None
        async with self.gate.writing(self.config.update_timeout_s, abort):
            self._precheck(request)  # another update may have committed while we staged
            probe_diff = await self._swap_in(staged, request.probe)
            self.gate.version = request.version
            self.revision = staged.revision
            self.broken = None
            previous, self.serving_dir = self.serving_dir, staged.folder
        self.discard_staged(previous)
        response = WeightUpdateResponse(
            policy_version=request.version,
            revision=staged.revision,
            transport=transport,
            bytes=staged.bytes,
            duration_s=time.perf_counter() - started,
            probe_max_abs_diff=probe_diff,
        )
        log.info(
            "policy version %d (%s, %d bytes, %.3fs, probe diff %s)",
            response.policy_version,
            transport,
            response.bytes,
            response.duration_s,
            probe_diff,
        )
        return response

    def discard_staged(self, folder: Path | None) -> None:
        """Remove a staged folder that no longer serves (never the model's own folder)."""
        if folder is not None and folder.parent == self.work_dir:
            shutil.rmtree(folder, ignore_errors=True)

    def shutdown(self) -> None:
        self._close()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
