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

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.endpoints import EndpointRegistry, Health
from gateway.errors import UpstreamError
from gateway.metricspec import Label, MetricSpec

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 1.0, 2.5,
)  # fmt: skip


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
        "switchyard_endpoint_running_requests",
        "Requests the engine reports running (vllm:num_requests_running, last scrape)",
        GaugeMetricFamily,
    ),
    (
        "switchyard_endpoint_ejected_ratio",
        "1 while the engine is ejected or half-open after consecutive failures, else 0",
        GaugeMetricFamily,
    ),
    (
        "switchyard_outlier_ejections",
        "Times the engine was ejected after consecutive failures",
        CounterMetricFamily,
    ),
    (
        "switchyard_endpoint_slow_ratio",
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
        running = families["switchyard_endpoint_running_requests"]
        ejected = families["switchyard_endpoint_ejected_ratio"]
        ejections = families["switchyard_outlier_ejections"]
        slow = families["switchyard_endpoint_slow_ratio"]
        for state in self._endpoints:
            snap = state.snapshot()
            in_flight.add_metric([state.id], snap.in_flight)
            healthy.add_metric([state.id], 1.0 if state.healthy else 0.0)
            ejected.add_metric([state.id], 0.0 if state.outlier.closed else 1.0)
            ejections.add_metric([state.id], state.outlier.ejections)
            slow.add_metric([state.id], 1.0 if snap.slow else 0.0)
            if snap.scraped_at is not None:
                scraped.add_metric([state.id], snap.scraped_at)
                running.add_metric([state.id], snap.running)
                waiting.add_metric([state.id], snap.waiting)
                kv_usage.add_metric([state.id], snap.kv_usage)
        yield from families.values()
        exhausted = CounterMetricFamily(
            "switchyard_proxy_refused_retries",
            "Failovers refused because retries reached their share of recent requests",
        )
        exhausted.add_metric([], self._endpoints.outliers.budget.exhausted)
        yield exhausted


ENDPOINT = Label(
    "endpoint",
    bound="an engine's id: a configured `engines[].id` (else its URL's host:port) or a"
    " discovered pod's name; bounded by the fleet (`none`: no engine answered)",
)
MODEL = Label(
    "model",
    bound="the requested model or adapter when an engine lists it (`/v1/models`), else"
    " `other`; bounded by the fleet's models and adapters",
)
POLICY = Label(
    "policy", bound="a routing policy name: the built-ins and `routing.profiles` (configuration)"
)


def _upstream_error_kinds() -> str:
    kinds = sorted({UpstreamError.__name__, *(c.__name__ for c in _subclasses(UpstreamError))})
    return (
        ", ".join(f"`{k}`" for k in kinds)
        + "; `http_<status>` for each status in `proxy.retry_statuses` (configuration)"
    )


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_proxy_requests_total", "counter", "requests",
               (MODEL, ENDPOINT, Label("status", bound="the HTTP status code sent to the client"))),
    MetricSpec("switchyard_proxy_request_duration_seconds", "histogram", "seconds",
               (MODEL, ENDPOINT)),
    MetricSpec("switchyard_proxy_time_to_first_token_seconds", "histogram", "seconds",
               (MODEL, ENDPOINT)),
    MetricSpec("switchyard_proxy_inter_token_latency_seconds", "histogram", "seconds",
               (MODEL, ENDPOINT)),
    MetricSpec("switchyard_proxy_prompt_tokens_total", "counter", "tokens", (MODEL, ENDPOINT)),
    MetricSpec("switchyard_proxy_completion_tokens_total", "counter", "tokens",
               (MODEL, ENDPOINT)),
    MetricSpec("switchyard_proxy_upstream_errors_total", "counter", "errors",
               (ENDPOINT, Label("kind", bound=_upstream_error_kinds()))),
    MetricSpec("switchyard_proxy_retries_total", "counter", "retries", (MODEL,)),
    MetricSpec("switchyard_proxy_stream_errors_total", "counter", "errors", (ENDPOINT,)),
    MetricSpec("switchyard_proxy_refused_retries_total", "counter", "retries"),
    MetricSpec("switchyard_proxy_in_flight_requests", "gauge", "requests", (ENDPOINT,)),
    MetricSpec("switchyard_routing_decisions_total", "counter", "decisions",
               (POLICY, Label("outcome", values=("hit", "spill", "cold", "no_endpoint",
                                                 "saturated", "ejected")))),
    MetricSpec("switchyard_routing_endpoint_decisions_total", "counter", "decisions",
               (POLICY, ENDPOINT)),
    MetricSpec("switchyard_routing_prefix_hit_blocks_total", "counter", "blocks",
               (POLICY, ENDPOINT)),
    MetricSpec("switchyard_routing_prompt_blocks_total", "counter", "blocks", (POLICY, ENDPOINT)),
    MetricSpec("switchyard_routing_adapter_decisions_total", "counter", "decisions",
               (Label("outcome", values=("running", "cold")),)),
    MetricSpec("switchyard_endpoint_healthy_ratio", "gauge", "ratio", (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_health_transitions_total", "counter", "transitions",
               (ENDPOINT, Label("state", values=tuple(h.value for h in Health)))),
    MetricSpec("switchyard_endpoint_scraped_timestamp_seconds", "gauge", "seconds",
               (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_running_requests", "gauge", "requests", (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_waiting_requests", "gauge", "requests", (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_kv_usage_ratio", "gauge", "ratio", (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_ejected_ratio", "gauge", "ratio", (ENDPOINT,)),
    MetricSpec("switchyard_endpoint_slow_ratio", "gauge", "ratio", (ENDPOINT,)),
    MetricSpec("switchyard_outlier_ejections_total", "counter", "ejections", (ENDPOINT,)),
    MetricSpec("switchyard_scrape_errors_total", "counter", "errors",
               (ENDPOINT, Label("kind", bound="`too_large`, `parse_error`, or the aiohttp"
                                " exception class of a failed fetch (`ClientConnectorError`,"
                                " `TimeoutError`, ...): a fixed class tree"))),
    MetricSpec("switchyard_admission_queued_requests", "gauge", "requests"),
    MetricSpec("switchyard_admission_wait_seconds", "histogram", "seconds"),
    MetricSpec("switchyard_admission_shed_requests_total", "counter", "requests",
               (Label("reason", values=("queue_full", "timeout", "shutdown", "disconnect")),)),
)  # fmt: skip
"""The families :class:`GatewayMetrics` and its endpoint collector export."""


_RequestChildren = tuple[Counter, Histogram, Histogram, Histogram, Counter, Counter]
_DecisionChildren = tuple[Counter, Counter, Counter, Counter]


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    ttft: Histogram
    itl: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    upstream_errors: Counter
    retries: Counter
    stream_errors: Counter
    decisions: Counter
    endpoint_decisions: Counter
    prefix_hit_blocks: Counter
    prompt_blocks: Counter
    adapter_decisions: Counter
    scrape_errors: Counter
    health_transitions: Counter
    admission_queued: Gauge
    admission_wait: Histogram
    admission_shed: Counter
    _request_children: dict[tuple[str, str, int], _RequestChildren] = field(
        default_factory=dict, repr=False
    )
    _decision_children: dict[tuple[str, str, str], _DecisionChildren] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def create(cls, endpoints: EndpointRegistry) -> GatewayMetrics:
        # prometheus_client's process-wide switch (idempotent): no ``*_created`` gauge per
        # counter and histogram child. In the text format Prometheus stores them as series of
        # their own (twice the series, none of them in the catalog).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        reg = CollectorRegistry(auto_describe=True)
        reg.register(_EndpointCollector(endpoints))
        model_endpoint = ["model", "endpoint"]
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
                model_endpoint,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            ttft=Histogram(
                "switchyard_proxy_time_to_first_token_seconds",
                "Streams: time from receiving the request to the engine's first token chunk",
                model_endpoint,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            itl=Histogram(
                "switchyard_proxy_inter_token_latency_seconds",
                "Streams: mean time between output tokens of one request, (last byte - first"
                " token) / (completion tokens - 1); one observation per stream of 2+ tokens",
                model_endpoint,
                buckets=_ITL_BUCKETS,
                registry=reg,
            ),
            prompt_tokens=Counter(
                "switchyard_proxy_prompt_tokens_total",
                "Prompt tokens of answered requests (the engine's usage, else the gateway's"
                " estimate)",
                model_endpoint,
                registry=reg,
            ),
            completion_tokens=Counter(
                "switchyard_proxy_completion_tokens_total",
                "Completion tokens of answered requests (the engine's usage, else the SSE"
                " events relayed)",
                model_endpoint,
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
            prefix_hit_blocks=Counter(
                "switchyard_routing_prefix_hit_blocks_total",
                "Leading prompt blocks the first-ranked engine is believed to hold (prefix"
                " index estimate; hit rate = this / switchyard_routing_prompt_blocks_total)",
                ["policy", "endpoint"],
                registry=reg,
            ),
            prompt_blocks=Counter(
                "switchyard_routing_prompt_blocks_total",
                "Prompt blocks hashed for prefix routing, by policy and first-ranked engine",
                ["policy", "endpoint"],
                registry=reg,
            ),
            adapter_decisions=Counter(
                "switchyard_routing_adapter_decisions_total",
                "Routing decisions for LoRA adapter requests (running: the first-ranked"
                " engine reports the adapter running or waiting; cold: it does not)",
                ["outcome"],
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
            admission_queued=Gauge(
                "switchyard_admission_queued_requests",
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
                "switchyard_admission_shed_requests_total",
                "Requests answered 503 by admission control, by reason (queue_full, timeout,"
                " shutdown, disconnect)",
                ["reason"],
                registry=reg,
            ),
        )

    def request_done(
        self,
        *,
        model: str,
        endpoint: str,
        status: int,
        duration_s: float,
        ttft_s: float | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """Count one finished proxied request. The children of each label set are kept:
        ``labels()`` takes a lock and builds its key on every call (the cache is as bounded as
        the label sets themselves). The inter-token latency is the stream's mean, derived
        here (no per-chunk work)."""
        key = (model, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, endpoint, str(status)),
                self.latency.labels(model, endpoint),
                self.ttft.labels(model, endpoint),
                self.itl.labels(model, endpoint),
                self.prompt_tokens.labels(model, endpoint),
                self.completion_tokens.labels(model, endpoint),
            )
            self._request_children[key] = children
        count, latency, ttft, itl, prompt, completion = children
        count.inc()
        latency.observe(duration_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)
            if completion_tokens > 1:
                itl.observe(max(0.0, duration_s - ttft_s) / (completion_tokens - 1))
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)

    def decided(
        self,
        *,
        policy: str,
        outcome: str,
        endpoint: str,
        hit_blocks: int = 0,
        prompt_blocks: int = 0,
    ) -> None:
        """Count one routing decision and its prefix estimate (children cached, as in
        :meth:`request_done`)."""
        key = (policy, outcome, endpoint)
        children = self._decision_children.get(key)
        if children is None:
            children = (
                self.decisions.labels(policy, outcome),
                self.endpoint_decisions.labels(policy, endpoint),
                self.prefix_hit_blocks.labels(policy, endpoint),
                self.prompt_blocks.labels(policy, endpoint),
            )
            self._decision_children[key] = children
        children[0].inc()
        children[1].inc()
        if prompt_blocks:
            children[3].inc(prompt_blocks)
            if hit_blocks:
                children[2].inc(hit_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
