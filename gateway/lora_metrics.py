"""LoRA metrics: the registry, what each engine holds, loads/unloads, on-demand waits, plans.

Counters and histograms live on the app's registry (:class:`LoraMetrics`); the gauges of
registered adapters (by origin) and loaded adapters (per engine, from the engines' last
``/v1/models``) are read at scrape time by :class:`LoraCollector`, so they cannot drift.

Example::

    metrics = LoraMetrics.create(app_registry)
    metrics.operations.labels(op="load", reason="on_demand", outcome="ok").inc()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.adapters import AdapterRegistry, Origin
from gateway.endpoints import EndpointRegistry
from gateway.metrics import ENDPOINT
from gateway.metricspec import Label, MetricSpec

__all__ = [
    "METRICS",
    "OPS_OUTCOMES",
    "REASONS",
    "SUPPRESSED_REASONS",
    "WAIT_OUTCOMES",
    "LoraCollector",
    "LoraMetrics",
]

REASONS = ("demand", "spread", "preload", "idle", "make_room", "on_demand", "reconcile",
           "admin", "configmap")  # fmt: skip
"""Why a load or unload happened (``routing.lora.PlacementAction.reason`` plus the admin
API's deletes and the unloads of adapters removed from, or changed in, the ConfigMap)."""
OPS_OUTCOMES = ("ok", "rejected", "failed", "timeout")
"""ok (the engine did it, or already had: 400 already loaded / 404 not found on unload),
rejected (another 4xx), failed (5xx, connection), timeout (``lora.request_timeout_s``)."""
SUPPRESSED_REASONS = ("demand", "on_demand")
"""Who wanted a load the backoff suppressed: the placement controller (one per adapter and
round) or a request (answered with the remembered refusal)."""
WAIT_OUTCOMES = ("loaded", "rejected", "failed", "no_slot", "timeout", "disconnect", "shutdown")
"""How an on-demand wait ended."""

_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_lora_adapters", "gauge", "adapters",
               (Label("origin", values=tuple(o.value for o in Origin)),)),
    MetricSpec("switchyard_lora_loaded_adapters", "gauge", "adapters", (ENDPOINT,)),
    MetricSpec("switchyard_lora_operations_total", "counter", "operations",
               (Label("op", values=("load", "unload")), Label("reason", values=REASONS),
                Label("outcome", values=OPS_OUTCOMES))),
    MetricSpec("switchyard_lora_load_duration_seconds", "histogram", "seconds"),
    MetricSpec("switchyard_lora_suppressed_operations_total", "counter", "operations",
               (Label("reason", values=SUPPRESSED_REASONS),)),
    MetricSpec("switchyard_lora_on_demand_requests_total", "counter", "requests",
               (Label("outcome", values=WAIT_OUTCOMES),)),
    MetricSpec("switchyard_lora_on_demand_wait_seconds", "histogram", "seconds"),
    MetricSpec("switchyard_lora_placement_decisions_total", "counter", "decisions",
               (Label("op", values=("load", "unload")), Label("reason", values=REASONS))),
    MetricSpec("switchyard_lora_reconciled_adapters_total", "counter", "adapters",
               (Label("change", values=("appeared", "vanished")),)),
)  # fmt: skip
"""The families :class:`LoraMetrics` and :class:`LoraCollector` export."""


@dataclass(frozen=True, slots=True)
class LoraMetrics:
    operations: Counter
    load_duration: Histogram
    suppressed: Counter
    on_demand: Counter
    on_demand_wait: Histogram
    decisions: Counter
    reconciled: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LoraMetrics:
        return cls(
            operations=Counter(
                "switchyard_lora_operations_total",
                "LoRA load/unload calls made to engines, by reason and outcome",
                ["op", "reason", "outcome"],
                registry=registry,
            ),
            load_duration=Histogram(
                "switchyard_lora_load_duration_seconds",
                "Time of successful /v1/load_lora_adapter calls (the engine's answer)",
                buckets=_LOAD_BUCKETS,
                registry=registry,
            ),
            suppressed=Counter(
                "switchyard_lora_suppressed_operations_total",
                "Adapter loads not made because every engine that could load the adapter"
                " refused or failed its last load and backs off (docs/lora.md)",
                ["reason"],
                registry=registry,
            ),
            on_demand=Counter(
                "switchyard_lora_on_demand_requests_total",
                "Requests that waited for an on-demand adapter load, by how the wait ended",
                ["outcome"],
                registry=registry,
            ),
            on_demand_wait=Histogram(
                "switchyard_lora_on_demand_wait_seconds",
                "Time requests waited for an on-demand adapter load (however it ended)",
                buckets=_LOAD_BUCKETS,
                registry=registry,
            ),
            decisions=Counter(
                "switchyard_lora_placement_decisions_total",
                "Actions the placement controller and on-demand loads decided, by reason",
                ["op", "reason"],
                registry=registry,
            ),
            reconciled=Counter(
                "switchyard_lora_reconciled_adapters_total",
                "Adapters an engine's /v1/models showed or dropped without this gateway"
                " loading or unloading them (loaded by hand, engine restarts)",
                ["change"],
                registry=registry,
            ),
        )


class LoraCollector(Collector):
    """Registered adapters by origin and loaded adapters per engine, read at scrape time."""

    def __init__(self, adapters: AdapterRegistry, endpoints: EndpointRegistry) -> None:
        self._adapters = adapters
        self._endpoints = endpoints

    def collect(self) -> Iterator[Metric]:
        registered = GaugeMetricFamily(
            "switchyard_lora_adapters", "Registered LoRA adapters, by origin", labels=["origin"]
        )
        adapters = self._adapters
        for origin in Origin:
            registered.add_metric([origin.value], adapters.count(origin))
        yield registered
        loaded = GaugeMetricFamily(
            "switchyard_lora_loaded_adapters",
            "LoRA adapters an engine lists in /v1/models (as of its last health probe or"
            " this gateway's last load/unload there)",
            labels=["endpoint"],
        )
        for state in self._endpoints:
            loaded.add_metric([state.id], sum(1 for card in state.models if card.parent))
        yield loaded
