"""Prometheus exporter of the queue figures: `rlad monitor --serve-metrics 9400`.

Each scrape of `/metrics` takes a fresh `QueueSnapshot` (services/monitor/snapshot.py) and exports
it; nothing is cached, so Prometheus sees exactly what `rlad monitor --once` would print.
The run counters are exported as counters (use `rate()` for per-stage throughput); a group
with nothing waiting has `rlad_queue_oldest_age_seconds` 0. When Redis cannot be read the
page still answers, with `rlad_monitor_redis_up 0`, and `/health` answers 503.

Metric names here are what docker/grafana/dashboards/rlad.json and
docker/prometheus/alerts.yml query; tests/unit/services/test_dashboard.py checks them
against a live page.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.http_server import create_base_app
from services.monitor.snapshot import QueueSnapshot, read_snapshot
from services.queue.connection import NoSuchRun, pick_run
from services.queue.queues import QueueReader

log = logging.getLogger(__name__)


class SnapshotCollector(Collector):
    """Reads `run`, or when it is None the only run on the Redis (found again at each
    scrape, so the exporter may start before the run does)."""

    def __init__(self, client: redis.Redis, run: str | None) -> None:
        self.client = client
        self.run = run

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("rlad_monitor_redis_up", "1 when the last read of Redis worked.")
        try:
            run = pick_run(self.client, self.run)
            snapshot = read_snapshot(QueueReader(self.client, run))
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        except NoSuchRun as exc:  # Redis answers; there is no one run to report yet
            log.warning("%s", exc)
            up.add_metric([], 1)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from snapshot_metrics(snapshot)


def snapshot_metrics(snapshot: QueueSnapshot) -> Iterator[Metric]:
    length = GaugeMetricFamily(
        "rlad_queue_stream_length", "Entries in the stream.", labels=["stream"]
    )
    for stream, value in snapshot.streams.items():
        length.add_metric([stream], value)
    yield length
    per_group = {
        "consumers": ("rlad_queue_consumers", "Consumers registered in the group."),
        "pending": ("rlad_queue_pending", "Delivered to a consumer, not yet acknowledged."),
        "lag": ("rlad_queue_lag", "Entries not yet delivered to the group."),
        "oldest_age_s": (
            "rlad_queue_oldest_age_seconds",
            "Age of the oldest entry the group has still to finish (0: none waiting).",
        ),
    }
    for field, (name, doc) in per_group.items():
        family = GaugeMetricFamily(name, doc, labels=["stream", "group"])
        for group in snapshot.groups:
            family.add_metric([group.stream, group.group], getattr(group, field) or 0)
        yield family
    backlog = GaugeMetricFamily(
        "rlad_queue_backlog", "Groups waiting for a scorer or the trainer (backpressure bound)."
    )
    backlog.add_metric([], snapshot.backlog)
    yield backlog
    groups = CounterMetricFamily(
        "rlad_pipeline_groups", "Prompt groups per pipeline event.", labels=["event"]
    )
    for event, total in snapshot.counters.items():
        groups.add_metric([event], total)
    yield groups
    pools = CounterMetricFamily(
        "rlad_pipeline_teacher_pool_groups",
        "Groups scored by each teacher pool (`default`: a run's one teacher).",
        labels=["pool"],
    )
    for pool, total in snapshot.teacher_pools.items():
        pools.add_metric([pool], total)
    yield pools
    yield from _trainer_metrics(snapshot)
    yield from _latency_metrics(snapshot)


def _trainer_metrics(snapshot: QueueSnapshot) -> Iterator[Metric]:
    trainer = snapshot.trainer
    gauges = {
        "rlad_trainer_step": ("Last optimizer step the trainer published.", trainer.step),
        "rlad_trainer_policy_version": ("Policy version of the trainer.", trainer.policy_version),
        "rlad_trainer_seconds_since_update": (
            "Seconds since the trainer last published its state.",
            trainer.seconds_since_update,
        ),
    }
    for name, (doc, value) in gauges.items():
        family = GaugeMetricFamily(name, doc)
        if value is not None:
            family.add_metric([], value)
        yield family
    staleness = CounterMetricFamily(
        "rlad_trainer_staleness_groups",
        "Groups the trainer consumed, by versions behind its policy.",
        labels=["versions_behind"],
    )
    for behind, count in trainer.staleness.items():
        staleness.add_metric([str(behind)], count)
    yield staleness


def _latency_metrics(snapshot: QueueSnapshot) -> Iterator[Metric]:
    latency = snapshot.teacher_latency
    quantiles = GaugeMetricFamily(
        "rlad_scorer_teacher_latency_ms",
        "Scorer→teacher call latency over the last calls (nearest-rank quantiles).",
        labels=["quantile"],
    )
    if latency.p50_ms is not None and latency.p99_ms is not None:
        quantiles.add_metric(["0.5"], latency.p50_ms)
        quantiles.add_metric(["0.99"], latency.p99_ms)
    yield quantiles


def create_app(client: redis.Redis, run: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(client, run))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    def redis_answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return create_base_app(
        title="rlad monitor",
        description="Queue, trainer and teacher-latency figures of an RLAD run, for Prometheus.",
        registry=registry,
        lifespan=lifespan,
        is_ready=redis_answers,
    )
