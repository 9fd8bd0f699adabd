"""Slow-engine filter: avoid engines the gateway judged slow while others can serve.

The gateway marks an engine slow when its TTFT EWMA is far above its peers' median
(:mod:`gateway.outliers`); the verdict arrives as ``EndpointSnapshot.slow``. A slow engine
still serves when every candidate is slow (the filter then keeps them all): slowness is a
preference, not an outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class NotSlow:
    """Drops endpoints marked slow unless that would drop them all.

    Example: ``NotSlow().filter(req, endpoints)``.
    """

    name: str = "not-slow"

    def filter(
        self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]
    ) -> Sequence[EndpointSnapshot]:
        kept = [ep for ep in endpoints if not ep.slow]
        return kept if kept else endpoints
