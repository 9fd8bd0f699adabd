"""Token load ("throughput" policy): balance outstanding *tokens*, not request counts.

Requests differ by orders of magnitude in prompt and output length, so counting requests
(least-request) lets one engine collect all the long ones. The gateway counts, per engine,
prompt tokens + expected output tokens of requests in flight (:mod:`routing.state`); the
engine with the least outstanding work gets the new request, which keeps every engine's
batch full and maximises aggregate tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class TokenLoad:
    """Score ``1 - in_flight_tokens / max``. Example: tokens [0, 5000] -> [1.0, 0.0]."""

    name: str = "token-load"

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        loads = [max(0, ep.in_flight_tokens) for ep in endpoints]
        top = max(loads, default=0)
        if top == 0:
            return [1.0] * len(endpoints)
        return [1.0 - load / top for load in loads]
