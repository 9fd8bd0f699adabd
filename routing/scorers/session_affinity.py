"""Session affinity: the same session (or user) keeps landing on the same engine.

Rendezvous (highest-random-weight) hashing: each endpoint's weight for a key is
``xxh3(key, endpoint id)`` and the heaviest wins. When an endpoint leaves the pool only the
keys it owned move (to their second choice); when one joins, only the keys it now wins move
-- no ring, no virtual nodes, no state. The key is ``session_key`` (from the session header),
else ``user``; a request with neither is neutral (all 1.0) and the other scorers decide.
Scores: 1.0 for the owner, then at most ``fallback_max`` decreasing by rank, so a weighted
load scorer can break affinity only for an overloaded owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from routing.types import EndpointSnapshot, RouteRequest


def rendezvous_order(key: str, endpoint_ids: Sequence[str]) -> list[str]:
    """Endpoint ids by descending rendezvous weight for ``key`` (owner first)."""
    return sorted(
        endpoint_ids,
        key=lambda eid: (-xxhash.xxh3_64_intdigest(f"{key}\x00{eid}".encode()), eid),
    )


@dataclass(frozen=True, slots=True)
class SessionAffinity:
    """Example: ``SessionAffinity().score(RouteRequest(model="m", session_key="s1"), eps)``."""

    fallback_max: float = 0.5
    name: str = "session-affinity"

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        key = req.session_key or req.user
        n = len(endpoints)
        if not key or n == 0:
            return [1.0] * n
        order = rendezvous_order(key, [ep.id for ep in endpoints])
        rank = {eid: i for i, eid in enumerate(order)}
        denom = max(1, n - 1)
        return [
            1.0 if rank[ep.id] == 0 else self.fallback_max * (n - 1 - rank[ep.id]) / denom
            for ep in endpoints
        ]
