"""Prometheus metrics of the gateway. With several workers, prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set by `python -m gateway` before any import of the client)
lets one scrape sum what every worker counted."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        r = self._registry
        self.requests = Counter(
            "gateway_requests", "Requests answered, by route and status.",
            ["route", "status"], registry=r,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_ttft = Histogram(
            "gateway_upstream_ttft_seconds",
            "Time from sending a chat to the runtime to its first token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.limiter = Counter(
            "gateway_limiter_decisions", "Rate limiter decisions (allowed, tenant, key, error).",
            ["decision"], registry=r,
        )
        self.ahead = Counter(
            "gateway_chats_started_ahead",
            "Chats whose run started before the rate limiter's decision came, by that decision "
            "(admitted, refused: the run was cancelled).",
            ["decision"], registry=r,
        )
        self.security = Counter(
            "gateway_security_events", "Refused attempts written to the audit log, by kind.",
            ["kind"], registry=r,
        )
        self.spool_depth = Gauge(
            "gateway_usage_spool_depth", "Usage events not yet acknowledged by Kafka.",
            multiprocess_mode="livesum", registry=r,
        )
        self.redis_round_trips = Counter(
            "gateway_limiter_redis_round_trips",
            "Round trips to Redis made by the rate limiter (checks are batched).", registry=r,
        )
        self.limiter_checks = Counter(
            "gateway_limiter_checks", "Rate limit checks sent to Redis.", registry=r,
        )
        self.usage_events = Counter(
            "gateway_usage_events",
            "Usage events emitted, by their request's outcome (completed, failed, cancelled).",
            ["status"], registry=r,
        )
        self.usage_delivery = Counter(
            "gateway_usage_delivery",
            "Usage events by delivery step (accepted, sent, spooled, replayed, failed, dropped).",
            ["step"], registry=r,
        )
        self.open_streams = Gauge(
            "gateway_open_streams", "Chat streams in flight.",
            multiprocess_mode="livesum", registry=r,
        )

        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """The labelled child of a metric, looked up once: `labels()` takes a lock per call."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.child(self.requests, route, str(status)).inc()
        self.child(self.latency, route).observe(seconds)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self._registry)
