"""Gateway metrics on an app-owned :class:`CollectorRegistry` (never the global one).

Names follow ``switchyard_<subsystem>_<name>_<unit>``; labels are bounded: ``endpoint`` is a
registered engine id, ``model`` a model the catalog knows (else ``"other"``), ``status`` an
HTTP status code, ``kind`` an error class name from :mod:`gateway.errors`. In-flight counts
and health are read from the endpoint registry at scrape time, so they cannot drift.

Example::

    metrics = GatewayMetrics.create(registry)
    metrics.requests.labels(model="m", endpoint="e1", status="200").inc()
    body = metrics.render()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.endpoints import EndpointRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


_EndpointFamily = GaugeMetricFamily | CounterMetricFamily

_ENDPOINT_FAMILIES: tuple[tuple[str, str, type[_EndpointFamily]], ...] = (
    (
        "switchyard_proxy_in_flight_requests",
        "Requests in flight per engine as this gateway routes on them (with redis_url "
        "every replica's, as of the last sync: take max, not sum, across replicas)",
        GaugeMetricFamily,
    ),
    (
        "switchyard_endpoint_healthy_ratio",
        "1 when the engine passes health checks, else 0",
        GaugeMetricFamily,
    ),
    (
        "switchyard_endpoint_scraped_timestamp_seconds",
        "Monotonic clock reading of the engine's last good /metrics scrape",
        GaugeMetricFamily,
    ),
    (
        "switchyard_endpoint_waiting_requests",
        "Requests waiting in the engine's queue (last scrape)",
        GaugeMetricFamily,
    ),
    (
        "switchyard_endpoint_kv_usage_ratio",
        "Engine KV-cache usage 0..1 (last scrape)",
        GaugeMetricFamily,
    ),
    (
        "switchyard_outlier_ejected",
        "1 while the engine is ejected or half-open after consecutive failures, else 0",
        GaugeMetricFamily,
    ),
    (
        "switchyard_outlier_ejections",
        "Times the engine was ejected after consecutive failures",
        CounterMetricFamily,
    ),
    (
        "switchyard_engine_slow",
        "1 while the engine's TTFT is far above its peers' median (routing avoids it)",
        GaugeMetricFamily,
    ),
)
"""Per-endpoint families, in exposition order: (name, help, kind), labelled ``endpoint``."""


class _EndpointCollector(Collector):
    """In-flight, health, outlier and slowness gauges read live from the endpoint registry,
    and the retry budget's refusals."""

    def __init__(self, endpoints: EndpointRegistry) -> None:
        self._endpoints = endpoints

    def collect(self) -> Iterator[Metric]:
        families = {
            name: kind(name, help_text, labels=["endpoint"])
            for name, help_text, kind in _ENDPOINT_FAMILIES
        }
        in_flight = families["switchyard_proxy_in_flight_requests"]
        healthy = families["switchyard_endpoint_healthy_ratio"]
        scraped = families["switchyard_endpoint_scraped_timestamp_seconds"]
        waiting = families["switchyard_endpoint_waiting_requests"]
        kv_usage = families["switchyard_endpoint_kv_usage_ratio"]
        ejected = families["switchyard_outlier_ejected"]
        ejections = families["switchyard_outlier_ejections"]
        slow = families["switchyard_engine_slow"]
        for state in self._endpoints:
            snap = state.snapshot()
            in_flight.add_metric([state.id], snap.in_flight)
            healthy.add_metric([state.id], 1.0 if state.healthy else 0.0)
            ejected.add_metric([state.id], 0.0 if state.outlier.closed else 1.0)
            ejections.add_metric([state.id], state.outlier.ejections)
            slow.add_metric([state.id], 1.0 if snap.slow else 0.0)
            if snap.scraped_at is not None:
                scraped.add_metric([state.id], snap.scraped_at)
                waiting.add_metric([state.id], snap.waiting)
                kv_usage.add_metric([state.id], snap.kv_usage)
        yield from families.values()
        exhausted = CounterMetricFamily(
            "switchyard_retry_budget_exhausted",
            "Failovers refused because retries reached their share of recent requests",
        )
        exhausted.add_metric([], self._endpoints.outliers.budget.exhausted)
        yield exhausted


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    ttft: Histogram
    upstream_errors: Counter
    retries: Counter
    stream_errors: Counter
    decisions: Counter
    endpoint_decisions: Counter
    prefix_hit_blocks: Histogram
    scrape_errors: Counter
    health_transitions: Counter
    admission_queue_depth: Gauge
    admission_wait: Histogram
    admission_shed: Counter
    _request_children: dict[tuple[str, str, int], tuple[Counter, Histogram, Histogram]] = field(
        default_factory=dict, repr=False
    )
    _decision_children: dict[tuple[str, str, str], tuple[Counter, Counter]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def create(cls, endpoints: EndpointRegistry) -> GatewayMetrics:
        reg = CollectorRegistry(auto_describe=True)
        reg.register(_EndpointCollector(endpoints))
        return cls(
            registry=reg,
            requests=Counter(
                "switchyard_proxy_requests_total",
                "Proxied requests by final status",
                ["model", "endpoint", "status"],
                registry=reg,
            ),
            latency=Histogram(
                "switchyard_proxy_request_duration_seconds",
                "Time from receiving the request to sending its last byte",
                ["model", "endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            ttft=Histogram(
                "switchyard_proxy_time_to_first_token_seconds",
                "Streams: time from receiving the request to the engine's first SSE chunk",
                ["model", "endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            upstream_errors=Counter(
                "switchyard_proxy_upstream_errors_total",
                "Failed attempts against an engine, by error kind",
                ["endpoint", "kind"],
                registry=reg,
            ),
            retries=Counter(
                "switchyard_proxy_retries_total",
                "Attempts moved to another engine before the first byte",
                ["model"],
                registry=reg,
            ),
            stream_errors=Counter(
                "switchyard_proxy_stream_errors_total",
                "Streams ended with an error event after headers were sent",
                ["endpoint"],
                registry=reg,
            ),
            decisions=Counter(
                "switchyard_routing_decisions_total",
                "Routing decisions by policy and prefix outcome (hit: the chosen engine holds"
                " the longest known prefix; spill: another one does; cold: none does;"
                " no_endpoint: nothing passed the filters; saturated: every engine that"
                " could serve is at its admission cap; ejected: only ejected engines could)",
                ["policy", "outcome"],
                registry=reg,
            ),
            endpoint_decisions=Counter(
                "switchyard_routing_endpoint_decisions_total",
                "Routing decisions by policy and first-ranked engine",
                ["policy", "endpoint"],
                registry=reg,
            ),
            prefix_hit_blocks=Histogram(
                "switchyard_routing_prefix_hit_blocks",
                "Leading prompt blocks the chosen engine is believed to hold",
                ["policy"],
                buckets=_BLOCK_BUCKETS,
                registry=reg,
            ),
            scrape_errors=Counter(
                "switchyard_scrape_errors_total",
                "Failed /metrics scrapes of an engine, by error kind",
                ["endpoint", "kind"],
                registry=reg,
            ),
            health_transitions=Counter(
                "switchyard_endpoint_health_transitions_total",
                "Engine health state changes",
                ["endpoint", "state"],
                registry=reg,
            ),
            admission_queue_depth=Gauge(
                "switchyard_admission_queue_depth",
                "Requests waiting for room under the concurrency caps",
                registry=reg,
            ),
            admission_wait=Histogram(
                "switchyard_admission_wait_seconds",
                "Time requests that found no room spent in the wait queue (admitted or shed)",
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            admission_shed=Counter(
                "switchyard_admission_shed_total",
                "Requests answered 503 by admission control, by reason (queue_full, timeout,"
                " shutdown, disconnect)",
                ["reason"],
                registry=reg,
            ),
        )

    def request_done(
        self, *, model: str, endpoint: str, status: int, duration_s: float, ttft_s: float | None
    ) -> None:
        """Count one finished proxied request. The children of each label set are kept:
        ``labels()`` takes a lock and builds its key on every call (the cache is as bounded as
        the label sets themselves)."""
        key = (model, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, endpoint, str(status)),
                self.latency.labels(model, endpoint),
                self.ttft.labels(model, endpoint),
            )
            self._request_children[key] = children
        count, latency, ttft = children
        count.inc()
        latency.observe(duration_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)

    def decided(self, *, policy: str, outcome: str, endpoint: str) -> None:
        """Count one routing decision (children cached, as in :meth:`request_done`)."""
        key = (policy, outcome, endpoint)
        children = self._decision_children.get(key)
        if children is None:
            children = (
                self.decisions.labels(policy, outcome),
                self.endpoint_decisions.labels(policy, endpoint),
            )
            self._decision_children[key] = children
        children[0].inc()
        children[1].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
