"""The autoscaler's time: what ``Observation.now`` reads and how the decision loop waits.

Production runs on :class:`WallClock`. The benchmark compresses simulated time (the emulated
cluster's engines run ``speed`` times faster than wall time), so its autoscaler runs on a
:class:`ScaledClock` of the same speed: one simulated second of interval lasts ``1/speed``
wall seconds, and every duration the policies and the actuator see (windows, cooldowns) is in
simulated seconds. Tests drive the pure parts with plain floats and need no clock at all.

Example::

    clock = ScaledClock(speed=10.0)
    await clock.sleep(1.0)  # 0.1 s of wall time
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import anyio

__all__ = ["Clock", "ScaledClock", "WallClock"]


class Clock(Protocol):
    """Seconds on some monotonic time line, and a sleep on the same line."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    """``time.monotonic`` and ``anyio.sleep``. Example: ``WallClock().now()``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))


@dataclass(slots=True)
class ScaledClock:
    """Simulated seconds since creation, running ``speed`` times faster than wall time.

    Example: ``ScaledClock(speed=5.0).now()`` (0.0 at creation).
    """

    speed: float = 1.0
    origin: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be > 0")

    def now(self) -> float:
        return (time.monotonic() - self.origin) * self.speed

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds) / self.speed)
