"""Least-KV-cache: prefer engines with more free KV cache (``vllm:kv_cache_usage_perc``).

A fuller cache means fewer free blocks for new prompts, more evictions of cached prefixes
and, at the limit, preemption of running requests. The signal is scraped (stale by up to one
interval), so profiles usually pair it with a gateway-counter scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class LeastKvCache:
    """Score ``1 - kv_usage``. Example: usages [0.2, 0.9] -> [0.8, 0.1]."""

    name: str = "least-kv-cache"

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        return [1.0 - min(1.0, max(0.0, ep.kv_usage)) for ep in endpoints]
