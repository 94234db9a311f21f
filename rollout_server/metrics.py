"""Prometheus metrics of one rollout server, on its own registry (served at `/metrics`).

Generated tokens per second is exported twice: as a counter for Prometheus' `rate()`, and
as a gauge over the last `window_s` seconds for anyone reading the page by eye.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.protocol import GenerateResponse, WeightUpdateResponse


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self.requests = Counter(
            "rlad_rollout_requests", "Generate requests by outcome.", ["outcome"], registry=registry
        )
        self.tokens = Counter(
            "rlad_rollout_generated_tokens", "Completion tokens generated.", registry=registry
        )
        self.tokens_per_s = Gauge(
            "rlad_rollout_tokens_per_second",
            "Completion tokens per second over the recent window.",
            registry=registry,
        )
        self.tokens_per_s.set_function(self._recent_rate)
        self.latency = Histogram(
            "rlad_rollout_request_latency_seconds",
            "Generate request latency.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.updates = Counter(
            "rlad_rollout_weight_updates",
            "Weight updates by transport and outcome.",
            ["transport", "outcome"],
            registry=registry,
        )
        self.update_seconds = Histogram(
            "rlad_rollout_weight_update_seconds",
            "Wall time of accepted weight updates, receive to verified.",
            ["transport"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.update_bytes = Counter(
            "rlad_rollout_weight_update_bytes",
            "Bytes of accepted weight updates.",
            ["transport"],
            registry=registry,
        )
        self.policy_version = Gauge(
            "rlad_rollout_policy_version", "Version of the weights now serving.", registry=registry
        )

    def _recent_rate(self) -> float:
        cutoff = time.monotonic() - self.window_s
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window_s

    def observe_generate(self, response: GenerateResponse, seconds: float) -> None:
        tokens = sum(len(c.token_ids) for r in response.results for c in r.completions)
        self.requests.labels("ok").inc()
        self.tokens.inc(tokens)
        self._recent.append((time.monotonic(), tokens))
        self.latency.observe(seconds)

    def observe_update(self, response: WeightUpdateResponse) -> None:
        self.updates.labels(response.transport, "ok").inc()
        self.update_seconds.labels(response.transport).observe(response.duration_s)
        self.update_bytes.labels(response.transport).inc(response.bytes)
        self.policy_version.set(response.policy_version)
