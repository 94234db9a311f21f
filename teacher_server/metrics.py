"""Prometheus metrics of one teacher server, in its own registry (served at `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)

# Error kinds by status, matching the `type` of the error body the shared handlers send.
ERROR_KINDS = {
    400: "malformed_body",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    499: "client_disconnected",
    500: "internal_error",
    503: "starting",
}


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rlad_teacher_requests", "Score requests by HTTP status.", ["status"], registry=r
        )
        self.sequences = Counter("rlad_teacher_sequences", "Sequences scored.", registry=r)
        self.tokens_scored = Counter(
            "rlad_teacher_tokens_scored", "Tokens whose logprob was returned.", registry=r
        )
        self.engine_tokens = Counter(
            "rlad_teacher_engine_tokens", "Tokens run through the model (cache misses).", registry=r
        )
        self.latency = Histogram(
            "rlad_teacher_request_latency_seconds",
            "Time from request received to response ready, successful score requests.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "rlad_teacher_batch_sequences",
            "Sequences per engine call (after dynamic batching).",
            buckets=BATCH_SEQUENCE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "rlad_teacher_batch_tokens",
            "Tokens per engine call.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "rlad_teacher_batch_requests",
            "Requests coalesced into one engine call.",
            buckets=BATCH_SEQUENCE_BUCKETS,
            registry=r,
        )
        self.queue_tokens = Gauge(
            "rlad_teacher_queue_tokens",
            "Admitted work waiting or being scored, in tokens as the engine pays for them "
            "(padding and top-k entries counted).",
            registry=r,
        )
        self.queue_requests = Gauge(
            "rlad_teacher_queue_requests", "Admitted requests waiting or being scored.", registry=r
        )
        self.errors = Counter(
            "rlad_teacher_errors", "Error responses by kind.", ["kind"], registry=r
        )
        self.cache_hits = Counter(
            "rlad_teacher_cache_hits", "Sequences answered from the logprob cache.", registry=r
        )
        self.cache_misses = Counter(
            "rlad_teacher_cache_misses", "Sequences the cache did not hold.", registry=r
        )
        self.cache_bytes = Gauge("rlad_teacher_cache_bytes", "Bytes held by the cache.", registry=r)

    def record_status(self, path: str, status: int) -> None:
        if path == "/v1/score":
            self.requests.labels(status=str(status)).inc()
        if status >= 400:
            self.errors.labels(kind=ERROR_KINDS.get(status, f"http_{status}")).inc()
