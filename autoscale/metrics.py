"""The autoscaler's Prometheus metrics, on a ``CollectorRegistry`` its owner passes in.

Embedded, that is the gateway's app-owned registry (scraped at the gateway's ``/metrics``);
standalone, the autoscaler's own (served by ``switchyard autoscaler --metrics-port``).
Labels are bounded: ``policy`` is the configured policy's name, ``reason`` a policy's short
reason vocabulary (names that are not short snake_case words, or beyond
:data:`MAX_REASONS` distinct ones, count as ``other``), ``kind`` one of :data:`ERROR_KINDS`,
``limit`` one of the actuator's limits.

Example::

    metrics = AutoscalerMetrics(CollectorRegistry(), policy="kpa")
    metrics.decided(reason="scale_up")
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from autoscale.signals import Observation

__all__ = ["ERROR_KINDS", "MAX_REASONS", "AutoscalerMetrics"]

ERROR_KINDS = ("api", "metrics", "policy")
"""``api``: a Kubernetes call failed (scale, pods, patch); ``metrics``: the engines' metrics
were stale or a scrape failed; ``policy``: the policy raised (a bug; the loop holds)."""
MAX_REASONS = 32
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")


class AutoscalerMetrics:
    """The ``switchyard_autoscaler_*`` series (see docs/autoscaling.md, Metrics)."""

    def __init__(self, registry: CollectorRegistry, *, policy: str) -> None:
        # No ``*_created`` gauge per child (see gateway/metrics.py); process-wide, idempotent.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.policy = policy
        self._reasons: set[str] = set()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"switchyard_autoscaler_{name}", doc, registry=registry)

        self.desired = gauge("desired_replicas", "Replicas the autoscaler wants (after limits)")
        self.recommended = gauge(
            "recommended_replicas", "Replicas the policy asked for (before limits)"
        )
        self.current = gauge("current_replicas", "spec.replicas of the scale target")
        self.ready = gauge("ready_replicas", "Ready pods of the scale target")
        self.panic = gauge("panic_ratio", "1 while the policy is in panic mode")
        self.leader = gauge("leader_ratio", "1 while this instance holds the lease and may actuate")
        self.holding = gauge(
            "holding_ratio", "1 while the loop holds (API error or stale metrics) and backs off"
        )
        self.arrival_rate = gauge("arrivals_per_second", "Requests/s arrived in the last tick")
        self.prompt_token_rate = gauge(
            "prompt_tokens_per_second", "Prompt tokens/s arrived in the last tick"
        )
        self.in_flight = gauge("in_flight_requests", "Requests in flight on the target's engines")
        self.queued_prompt_tokens = gauge(
            "queued_prompt_tokens", "Prompt tokens sent to the engines, no first token yet"
        )
        self.waiting = gauge("waiting_requests", "vllm:num_requests_waiting summed over engines")
        self.decisions = Counter(
            "switchyard_autoscaler_decisions",
            "Decisions, by policy and reason",
            ["policy", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "switchyard_autoscaler_errors",
            "Failed ticks and calls, by kind (api, metrics, policy)",
            ["kind"],
            registry=registry,
        )
        self.limited = Counter(
            "switchyard_autoscaler_limited_decisions",
            "Decisions the actuator's limits changed, by limit",
            ["limit"],
            registry=registry,
        )
        self.patches = Counter(
            "switchyard_autoscaler_scale_patches", "Scale patches applied", registry=registry
        )
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)  # every kind present from the start, at 0

    def reason_label(self, reason: str) -> str:
        """``reason`` if it is a short snake_case word among the first MAX_REASONS, else
        ``other``."""
        if reason in self._reasons:
            return reason
        if _REASON.fullmatch(reason) is None or len(self._reasons) >= MAX_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason

    def decided(self, *, reason: str) -> None:
        self.decisions.labels(policy=self.policy, reason=self.reason_label(reason)).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind if kind in ERROR_KINDS else "api").inc()

    def observed(self, obs: Observation) -> None:
        self.current.set(obs.current)
        self.ready.set(obs.ready)
        self.arrival_rate.set(obs.arrival_rate)
        self.prompt_token_rate.set(obs.prompt_token_rate)
        self.in_flight.set(sum(e.in_flight for e in obs.engines))
        self.queued_prompt_tokens.set(sum(e.queued_prompt_tokens for e in obs.engines))
        self.waiting.set(sum(e.waiting for e in obs.engines))
