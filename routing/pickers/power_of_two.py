"""Power-of-two-choices picker: sample two endpoints per request, take the better one.

Classic P2C load balancing (Mitzenmacher): comparing two random candidates instead of all of
them avoids the herd effect of "always the global best" when scores are stale, while still
steering away from loaded endpoints. The two choices are derived from ``RouteRequest.seq``
(no mutable RNG), so the picker is pure and table-testable. The remaining endpoints follow
by score, giving the proxy a failover order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.pickers.basic import jitter
from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class PowerOfTwoPicker:
    """Best of two seq-derived candidates first. Example: with LeastRequest scores."""

    name: str = "power-of-two"

    def pick(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        scores: Sequence[float],
    ) -> list[EndpointSnapshot]:
        pairs = sorted(zip(endpoints, scores, strict=True), key=lambda p: jitter(req.seq, p[0].id))
        head = sorted(pairs[:2], key=lambda p: -p[1])  # stable: equal scores keep random order
        tail = sorted(pairs[2:], key=lambda p: -p[1])
        return [ep for ep, _ in head + tail]
