"""Basic pickers (max-score, random, round-robin): combined scores -> a ranking.

Ties are spread, never piled on one endpoint: among equal scores the endpoint routed to
least recently (``EndpointSnapshot.last_routed_seq``) comes first, then a seq-derived
pseudo-random order. The first alone makes tied traffic rotate like round-robin at any
concurrency (even strictly one request at a time, where every endpoint is idle and tied:
the peers' ``cache_aware`` sends 100 % of such traffic to one worker); the second spreads
endpoints that have never been routed to, or snapshots built without the counter.

Randomness is derived from ``RouteRequest.seq`` through xxhash, so pickers are pure and
table-testable while consecutive requests still spread across equal endpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from routing.types import EndpointSnapshot, RouteRequest


def jitter(seq: int, endpoint_id: str) -> int:
    """A deterministic pseudo-random 64-bit value per (request seq, endpoint)."""
    return xxhash.xxh3_64_intdigest(f"{seq}\x00{endpoint_id}".encode())


@dataclass(frozen=True, slots=True)
class MaxScorePicker:
    """Highest score first; scores within ``tie_epsilon`` count as equal and are ordered
    least-recently-routed first, then shuffled by seq.

    Example: ``MaxScorePicker().pick(req, eps, [0.2, 0.9])[0] is eps[1]``.
    """

    tie_epsilon: float = 1e-6
    name: str = "max-score"

    def pick(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        scores: Sequence[float],
    ) -> list[EndpointSnapshot]:
        eps = self.tie_epsilon

        def key(pair: tuple[EndpointSnapshot, float]) -> tuple[int, int, int]:
            ep, score = pair
            bucket = -int(score / eps) if eps > 0 else 0
            return (bucket, ep.last_routed_seq, jitter(req.seq, ep.id))

        return [ep for ep, _ in sorted(zip(endpoints, scores, strict=True), key=key)]


@dataclass(frozen=True, slots=True)
class RandomPicker:
    """A uniformly random ranking (per ``seq``), ignoring scores."""

    name: str = "random"

    def pick(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        scores: Sequence[float],
    ) -> list[EndpointSnapshot]:
        return sorted(endpoints, key=lambda ep: jitter(req.seq, ep.id))


@dataclass(frozen=True, slots=True)
class RoundRobinPicker:
    """Endpoint ``seq mod n`` (in id order) first, then the ones after it."""

    name: str = "round-robin"

    def pick(
        self,
        req: RouteRequest,
        endpoints: Sequence[EndpointSnapshot],
        scores: Sequence[float],
    ) -> list[EndpointSnapshot]:
        ordered = sorted(endpoints, key=lambda ep: ep.id)
        start = req.seq % len(ordered)
        return ordered[start:] + ordered[:start]
