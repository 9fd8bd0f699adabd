"""Least-request: fewer requests in flight (ours or the engine's running+waiting) scores higher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class LeastRequest:
    """Score ``1 - load / max_load`` (all equal when idle). Example: loads [0, 4] -> [1.0, 0.0]."""

    name: str = "least-request"

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        loads = [ep.load for ep in endpoints]
        top = max(loads, default=0)
        if top == 0:
            return [1.0] * len(endpoints)
        return [1.0 - load / top for load in loads]
