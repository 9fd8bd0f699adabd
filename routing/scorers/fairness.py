"""Fairness (VTC-style): light users get the least-loaded engines, heavy users a home engine.

A router cannot reorder an engine's queue, but it can decide *whose* requests share a queue.
A user's standing ``share`` in [0, 1] is how far its virtual token counter
(:mod:`routing.fairness`) sits above the lightest active user, relative to the active range
(at least ``scale_tokens``). Each endpoint scores::

    (1 - share) * free + share * home

where ``free`` is ``1 - load / max_load`` (least-request) and ``home`` is the user's
rendezvous-hash rank (1.0 for its own endpoint). The lightest users spread to free capacity;
the heaviest concentrate on their own endpoint, so a flood from one user queues mostly behind
itself instead of behind everyone. Without a view (no user) the scorer is plain least-request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routing.scorers.session_affinity import rendezvous_order
from routing.types import EndpointSnapshot, RouteRequest


@dataclass(frozen=True, slots=True)
class Fairness:
    """Example: a user at the top of the active range is steered to its home endpoint."""

    scale_tokens: float = 10_000.0
    name: str = "fairness"

    def share(self, req: RouteRequest) -> float:
        view = req.fairness
        if view is None or req.user is None or view.active_users < 2:
            return 0.0
        span = max(self.scale_tokens, view.high - view.low)
        return min(1.0, max(0.0, (view.counter - view.low) / span))

    def score(self, req: RouteRequest, endpoints: Sequence[EndpointSnapshot]) -> list[float]:
        n = len(endpoints)
        loads = [ep.load for ep in endpoints]
        top = max(loads, default=0)
        free = [1.0 if top == 0 else 1.0 - load / top for load in loads]
        share = self.share(req)
        if share == 0.0 or req.user is None:
            return free
        order = rendezvous_order(req.user, [ep.id for ep in endpoints])
        rank = {eid: i for i, eid in enumerate(order)}
        home = [1.0 - rank[ep.id] / max(1, n - 1) for ep in endpoints]
        return [(1.0 - share) * f + share * h for f, h in zip(free, home, strict=True)]
