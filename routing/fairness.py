"""Virtual token counters (VTC, Sheng et al., OSDI 2024) for per-user fairness.

Each user's counter accumulates the weighted service they received (``input_weight`` per
prompt token + ``output_weight`` per generated token; the paper uses 1 and 2). When a user
becomes active again after being idle, its counter is *lifted* to the smallest counter among
active users, so idle time cannot be banked as credit. The fairness scorer
(:mod:`routing.scorers.fairness`) reads a user's standing from a :class:`FairnessView`.

This is mutable state with a single owner: the gateway keeps one instance, calls
``admit`` when routing (and puts the returned view into ``RouteRequest.fairness``),
``charge`` as tokens are counted and ``release`` when the request ends. The user table is
bounded (least recently seen idle users are forgotten first).

Replicas (gateway/sharedstate.py) share the service received, not the lifts: after
``track_charges()`` every ``charge`` is also summed per user until ``take_charges()`` hands
the sums over (to publish them), and ``add_remote`` adds the service other replicas gave a
user. Each replica's counters are then the global service plus its own lifts.

Example::

    vtc = VirtualTokenCounters()
    view = vtc.admit("alice")
    vtc.charge("alice", input_tokens=900, output_tokens=120)
    vtc.release("alice")
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from routing.types import FairnessView

__all__ = ["VirtualTokenCounters"]


class VirtualTokenCounters:
    """Per-user virtual token counters with VTC's counter lift. Not thread-safe."""

    def __init__(
        self, *, input_weight: float = 1.0, output_weight: float = 2.0, max_users: int = 100_000
    ) -> None:
        if max_users <= 0:
            raise ValueError("max_users must be positive")
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.max_users = max_users
        self._counters: OrderedDict[str, float] = OrderedDict()
        self._active: dict[str, int] = {}
        self._charges: dict[str, float] | None = None  # unpublished charges, when tracked

    def admit(self, user: str) -> FairnessView:
        """A request of ``user`` is being routed; returns its standing for the policy."""
        if user not in self._active:
            lifted = min((self._counters[u] for u in self._active), default=0.0)
            self._counters[user] = max(self._counters.get(user, 0.0), lifted)
            self._active[user] = 0
        self._active[user] += 1
        self._counters.move_to_end(user)
        self._evict()
        return self.view(user)

    def charge(self, user: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add service received; unknown users are created at the active minimum."""
        cost = self.input_weight * input_tokens + self.output_weight * output_tokens
        self._add(user, cost)
        charges = self._charges
        if charges is not None and (user in charges or len(charges) < self.max_users):
            charges[user] = charges.get(user, 0.0) + cost

    def track_charges(self) -> None:
        """From now on sum each user's charges for :meth:`take_charges` (replicas)."""
        if self._charges is None:
            self._charges = {}

    def take_charges(self) -> dict[str, float]:
        """The charges since the last call, per user (at most ``max_users`` users; empty
        unless tracked), and start a new sum."""
        charges = self._charges or {}
        if self._charges is not None:
            self._charges = {}
        return charges

    def add_remote(self, charges: Mapping[str, float]) -> None:
        """Service other replicas gave these users (never published again)."""
        for user, cost in charges.items():
            self._add(user, cost)

    def release(self, user: str) -> None:
        """A request of ``user`` ended (any way); extra calls are ignored."""
        count = self._active.get(user)
        if count is None:
            return
        if count <= 1:
            del self._active[user]
        else:
            self._active[user] = count - 1

    def view(self, user: str) -> FairnessView:
        counter = self._counters.get(user, 0.0)
        active = [self._counters[u] for u in self._active]
        return FairnessView(
            counter=counter,
            low=min(active, default=counter),
            high=max(active, default=counter),
            active_users=len(active),
        )

    def counter(self, user: str) -> float:
        return self._counters.get(user, 0.0)

    def __len__(self) -> int:
        return len(self._counters)

    def _add(self, user: str, cost: float) -> None:
        if user not in self._counters:
            self._counters[user] = min((self._counters[u] for u in self._active), default=0.0)
        self._counters[user] += cost
        self._counters.move_to_end(user)
        self._evict()

    def _evict(self) -> None:
        if len(self._counters) <= self.max_users:
            return
        for user in list(self._counters):
            if len(self._counters) <= self.max_users:
                return
            if user not in self._active:
                del self._counters[user]
