"""Fault injection for one simulated engine (flags at start, ``POST /admin/faults`` at run time).

Faults: a seeded error rate with a list of statuses to draw from, hanging requests (never answered
until the client leaves), a slowdown factor on step times, closing the connection after N streamed
tokens, refusing connections (stop listening), and a dead engine (``/health`` 503, requests 503).
All random draws come from one ``random.Random(seed)`` so a run is reproducible. A request can
also force its own failure with the header ``X-Return-Error: <status>`` (llm-d-inference-sim).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from enginesim.server.protocol import FaultsUpdate

__all__ = ["FaultInjector", "Faults"]


@dataclass(frozen=True, slots=True)
class Faults:
    """The fault settings of one engine.

    >>> Faults(error_rate=0.1, error_status=(429, 503))
    """

    error_rate: float = 0.0
    error_status: tuple[int, ...] = (500,)
    hang: bool = False
    slowdown: float = 1.0
    crash_mid_stream_after_tokens: int | None = None
    refuse_connections: bool = False
    dead: bool = False

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["error_status"] = list(self.error_status)
        return out


class FaultInjector:
    """Holds the current :class:`Faults` and the seeded RNG that decides injected errors.

    >>> inj = FaultInjector(Faults(error_rate=1.0), seed=0); inj.draw_error()
    500
    """

    def __init__(self, faults: Faults, *, seed: int) -> None:
        self._faults = faults
        self._rng = random.Random(seed)

    @property
    def faults(self) -> Faults:
        return self._faults

    def update(self, upd: FaultsUpdate) -> Faults:
        base = Faults() if upd.clear else self._faults
        changes: dict[str, Any] = {}
        for name in ("error_rate", "hang", "slowdown", "refuse_connections", "dead"):
            value = getattr(upd, name)
            if value is not None:
                changes[name] = value
        if upd.error_status is not None:
            statuses = tuple(s for s in upd.error_status if 400 <= s <= 599)
            changes["error_status"] = statuses or (500,)
        if upd.crash_mid_stream_after_tokens is not None:
            changes["crash_mid_stream_after_tokens"] = upd.crash_mid_stream_after_tokens
        self._faults = replace(base, **changes)
        return self._faults

    def set_refusing(self, refusing: bool) -> None:
        self._faults = replace(self._faults, refuse_connections=refusing)

    def draw_error(self) -> int | None:
        """An HTTP status to fail this request with, or None (one RNG draw per request)."""
        f = self._faults
        if f.error_rate <= 0.0:
            return None
        if self._rng.random() >= f.error_rate:
            return None
        return f.error_status[self._rng.randrange(len(f.error_status))]
