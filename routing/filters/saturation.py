"""Saturation filter: keep engines that still have headroom (queue and KV cache).

An engine with a long queue or an almost full KV cache will add queueing delay or preempt
running requests; sending more there only hurts. Thresholds follow GIE's defaults (queue > 5
or KV > 0.8 counts as saturated) but are configurable. When *every* endpoint is saturated
the filter keeps them all (routing still picks the least bad one) unless ``shed`` is set, in
which case the empty result makes the policy raise ``NoEndpointError("saturation")`` and the
gateway can answer 503/429 instead of queueing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class NotSaturated:
    """Drops endpoints with ``waiting > max_waiting`` or ``kv_usage > max_kv_usage``.

    Example: ``NotSaturated(max_waiting=5, max_kv_usage=0.8)``.
    """

    max_waiting: int = 5
    max_kv_usage: float = 0.8
    shed: bool = False
    name: str = "saturation"

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]:
        kept = [
            ep
            for ep in endpoints
            if ep.waiting <= self.max_waiting and ep.kv_usage <= self.max_kv_usage
        ]
        if kept or self.shed:
            return kept
        return endpoints
