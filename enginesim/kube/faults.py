"""The emulator's fault knobs (``PUT/GET /_sim/faults``); they never apply to ``/_sim/``.

- ``error_rate`` (0..1): that share of API answers is ``500 InternalError``.
- ``latency_s``: every API answer is delayed by that many wall seconds (a client's timeouts
  are wall-clock, so this knob is not scaled by ``--speed``).
- ``cut_watches``: setting it true cuts every open watch stream once (it reads false again).
- ``gone_watches``: the next N watch requests answer an ERROR event with a 410 Status.
- ``conflicts``: the next N writes (POST/PUT/PATCH/DELETE) answer ``409 Conflict``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FaultError", "FaultKnobs", "Faults"]

MAX_LATENCY_S = 60.0
MAX_COUNT = 1_000_000


class FaultError(ValueError):
    """An invalid knob value (``PUT /_sim/faults`` answers 400)."""


@dataclass(slots=True)
class FaultKnobs:
    error_rate: float = 0.0
    latency_s: float = 0.0
    cut_watches: bool = False
    gone_watches: int = 0
    conflicts: int = 0


class Faults:
    """The knobs plus their seeded randomness; ``update`` validates a PUT body."""

    def __init__(self, seed: int = 0) -> None:
        self.knobs = FaultKnobs()
        self._rng = random.Random(seed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self.knobs)

    def update(self, body: Any) -> bool:
        """Apply the given knobs (others unchanged); returns whether to cut watches now."""
        if not isinstance(body, dict):
            raise FaultError("faults: a JSON object")
        unknown = set(body) - set(asdict(self.knobs))
        if unknown:
            raise FaultError(f"faults: unknown knob(s) {sorted(unknown)}")
        k = self.knobs
        if "error_rate" in body:
            k.error_rate = _number(body["error_rate"], "error_rate", 0.0, 1.0)
        if "latency_s" in body:
            k.latency_s = _number(body["latency_s"], "latency_s", 0.0, MAX_LATENCY_S)
        if "gone_watches" in body:
            k.gone_watches = int(_number(body["gone_watches"], "gone_watches", 0, MAX_COUNT))
        if "conflicts" in body:
            k.conflicts = int(_number(body["conflicts"], "conflicts", 0, MAX_COUNT))
        cut = body.get("cut_watches", False)
        if not isinstance(cut, bool):
            raise FaultError("faults: cut_watches is a boolean")
        return cut

    def take_error(self) -> bool:
        return self.knobs.error_rate > 0 and self._rng.random() < self.knobs.error_rate

    def take_gone(self) -> bool:
        if self.knobs.gone_watches > 0:
            self.knobs.gone_watches -= 1
            return True
        return False

    def take_conflict(self) -> bool:
        if self.knobs.conflicts > 0:
            self.knobs.conflicts -= 1
            return True
        return False


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"faults: {name} is a number")
    if not low <= float(value) <= high:
        raise FaultError(f"faults: {name} must be within [{low}, {high}]")
    return float(value)
