"""Failover hardening as pure state machines: outlier ejection, the retry budget, slowness.

Nothing here does I/O or reads the wall clock: every object takes a ``clock`` (monotonic
seconds) at construction, so table tests drive time by hand. :mod:`gateway.endpoints`
holds one :class:`OutlierDetector` per engine (all made by one :class:`Outliers` pool,
which also owns the :class:`RetryBudget` and the :class:`SlowDetector`);
:mod:`gateway.proxy` reports each attempt's outcome and asks the budget before a failover.

**Ejection** (passive, from real traffic; the active health checker is separate and keeps
working): ``consecutive_failures`` failed attempts in a row (an engine 5xx, a connect error,
a timeout) eject the engine for ``base_ejection_s * 2**(n-1)`` seconds, ``n`` the times it
was ejected recently, capped at ``max_ejection_s``. While ejected routing skips it. When the
time is up it is *half-open*: exactly one real request may go there (the probe); success
readmits it, failure ejects it again for twice as long. The count ``n`` decays by one per
``max_ejection_s`` spent readmitted. Outcomes of other requests that were already on the
engine when it was ejected are ignored: only the probe decides. At most
``max_ejected_fraction`` of the engines are out (ejected or half-open) at once, rounded
down, so one engine alone is never ejected.

**Retry budget**: failovers may be at most ``retry_budget_ratio`` of the requests of the
last ``retry_budget_window_s`` seconds, plus ``retry_budget_min_per_s * window`` so a quiet
gateway can still retry; during an outage retries cannot multiply the load. The window
slides in ten buckets (so it is exact to a tenth of the window).

**Slowness**: an engine whose TTFT EWMA exceeds ``slow_factor`` x the median of its peers'
(the other healthy engines serving one of its models, each with at least
``slow_min_samples`` samples) is slow; routing avoids it while others are available. A slow
engine gets little traffic, so its EWMA would never recover: after ``slow_hold_s`` it is
given a trial (not slow) and is marked again only after ``slow_min_samples`` fresh samples
still say so.

Example::

    pool = Outliers(settings.outliers, clock=time.monotonic)
    detector = pool.detector()             # one per engine
    if detector.routable():
        probe = detector.take_probe()      # True when this request is the half-open probe
        ejected = detector.failure(probe=probe)
    if pool.budget.retry():                # before moving to the next engine
        ...
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.settings import OutlierSettings

__all__ = [
    "LatencyView",
    "OutlierDetector",
    "Outliers",
    "Phase",
    "RetryBudget",
    "SlowDetector",
    "slow_candidates",
]

Clock = Callable[[], float]

_BUCKETS = 10
"""Retry-budget window resolution: the window slides a tenth at a time."""


class Phase(enum.StrEnum):
    CLOSED = "ok"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"


class Outliers:
    """The engine pool's side of ejection: the clock, the cap on engines out at once, the
    retry budget and the slow detector. One per :class:`gateway.endpoints.EndpointRegistry`."""

    __slots__ = ("budget", "clock", "out", "settings", "size", "slow")

    def __init__(self, settings: OutlierSettings, *, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.size = 0  # engines with a detector
        self.out = 0  # detectors not CLOSED (ejected or half-open)
        self.budget = RetryBudget(settings, clock=clock)
        self.slow = SlowDetector(settings, clock=clock)

    def detector(self) -> OutlierDetector:
        """A detector for one more engine (counted in the ejection cap)."""
        self.size += 1
        return OutlierDetector(self)

    def retire(self, detector: OutlierDetector) -> None:
        """The engine left the pool: it no longer counts, ejected or not."""
        self.size -= 1
        if detector.phase is not Phase.CLOSED:
            self.out -= 1
            detector.phase = Phase.CLOSED

    def may_eject(self) -> bool:
        """Another engine may go out: fewer than ``max_ejected_fraction`` of them are."""
        cap = math.floor(self.settings.max_ejected_fraction * self.size + 1e-9)
        return self.out < cap


class OutlierDetector:
    """One engine's passive ejection state: closed -> ejected -> half-open -> closed or
    ejected again (see the module docstring). Example: ``pool.detector().routable()``."""

    __slots__ = ("_calm_since", "_pool", "ejections", "failures", "phase", "probing", "times",
                 "until")  # fmt: skip

    def __init__(self, pool: Outliers) -> None:
        self._pool = pool
        self.phase = Phase.CLOSED
        self.failures = 0  # consecutive, while closed
        self.times = 0  # recent ejections (the backoff exponent), decays while closed
        self.ejections = 0  # every ejection ever (a counter for metrics)
        self.until = 0.0  # end of the current ejection (clock seconds)
        self.probing = False  # half-open: the one probe request is out
        self._calm_since = 0.0

    @property
    def closed(self) -> bool:
        """Admitted (not ejected, not half-open)."""
        return self.phase is Phase.CLOSED

    def routable(self) -> bool:
        """May routing send a request here now: closed, or half-open with no probe out."""
        if self.phase is Phase.CLOSED:
            return True
        if self.phase is Phase.EJECTED:
            if self._pool.clock() < self.until:
                return False
            self.phase = Phase.HALF_OPEN
        return not self.probing

    def take_probe(self) -> bool:
        """A request is starting here: True when it is the half-open probe (call right
        after :meth:`routable` said yes; a closed engine takes no probe)."""
        if self.phase is Phase.CLOSED or not self.routable():
            return False
        self.probing = True
        return True

    def probe_ended(self) -> None:
        """The probe ended without an outcome (the client left, the deadline hit): another
        request may probe."""
        if self.phase is Phase.HALF_OPEN:
            self.probing = False

    def success(self, *, probe: bool) -> None:
        """An attempt got a response < 500 from the engine."""
        if self.phase is Phase.CLOSED:
            self.failures = 0
        elif probe and self.probing:
            self.phase = Phase.CLOSED
            self.probing = False
            self.failures = 0
            self._calm_since = self._pool.clock()
            self._pool.out -= 1

    def failure(self, *, probe: bool) -> bool:
        """An attempt failed (5xx, connect error, timeout); True when this ejected it."""
        if self.phase is Phase.CLOSED:
            self.failures += 1
            if self.failures < self._pool.settings.consecutive_failures:
                return False
            if not self._pool.may_eject():
                return False
            self._pool.out += 1
            self._eject()
            return True
        if probe and self.probing:
            self._eject()
            return True
        return False

    def ejection_s(self) -> float:
        """How long the next ejection would last (after the decay of ``times``)."""
        settings = self._pool.settings
        return min(settings.base_ejection_s * 2.0 ** self._decayed(), settings.max_ejection_s)

    def remaining_s(self) -> float:
        """Seconds until an ejected engine turns half-open (0 when not ejected)."""
        if self.phase is not Phase.EJECTED:
            return 0.0
        return max(0.0, self.until - self._pool.clock())

    def _decayed(self) -> int:
        """``times`` after its decay: one step per ``max_ejection_s`` spent closed."""
        if self.phase is not Phase.CLOSED or not self.times:
            return self.times
        period = self._pool.settings.max_ejection_s
        steps = int((self._pool.clock() - self._calm_since) / period)
        if steps:
            self.times = max(0, self.times - steps)
            self._calm_since += steps * period
        return self.times

    def _eject(self) -> None:
        duration = self.ejection_s()
        self.times += 1
        self.ejections += 1
        self.phase = Phase.EJECTED
        self.probing = False
        self.failures = 0
        self.until = self._pool.clock() + duration


class RetryBudget:
    """Failovers allowed while they stay within ``ratio`` x recent requests + a floor.

    Example: ``budget.request()`` once per request; ``if budget.retry(): fail over``.
    """

    __slots__ = ("_clock", "_requests", "_retries", "_slot", "_width", "exhausted", "floor",
                 "ratio", "requests", "retries")  # fmt: skip

    def __init__(self, settings: OutlierSettings, *, clock: Clock) -> None:
        window = settings.retry_budget_window_s
        self._clock = clock
        self._width = window / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._slot = math.floor(clock() / self._width)
        self.ratio = settings.retry_budget_ratio
        self.floor = settings.retry_budget_min_per_s * window
        self.requests = 0  # in the window
        self.retries = 0  # in the window
        self.exhausted = 0  # retries refused, ever (a counter for metrics)

    def request(self) -> None:
        """Count one request (its first attempt)."""
        index = self._advance()
        self._requests[index] += 1
        self.requests += 1

    def retry(self) -> bool:
        """Spend one retry if the budget allows it; False (and counted) when exhausted."""
        index = self._advance()
        if self.retries >= self.ratio * self.requests + self.floor:
            self.exhausted += 1
            return False
        self._retries[index] += 1
        self.retries += 1
        return True

    def window(self) -> tuple[int, int]:
        """(requests, retries) in the window now."""
        self._advance()
        return self.requests, self.retries

    def _advance(self) -> int:
        """Slide the window to now (buckets that fell out are dropped); the current index."""
        slot = math.floor(self._clock() / self._width)
        if slot != self._slot:
            for step in range(1, min(slot - self._slot, _BUCKETS) + 1):
                index = (self._slot + step) % _BUCKETS
                self.requests -= self._requests[index]
                self.retries -= self._retries[index]
                self._requests[index] = self._retries[index] = 0
            self._slot = slot
        return slot % _BUCKETS


@dataclass(frozen=True, slots=True)
class LatencyView:
    """What slowness detection reads of one engine."""

    id: str
    models: frozenset[str]
    healthy: bool
    ttft_s: float | None
    samples: int


def slow_candidates(
    views: Iterable[LatencyView], *, factor: float, min_samples: int
) -> frozenset[str]:
    """Engines whose TTFT EWMA exceeds ``factor`` x the median of their peers: the other
    healthy engines with ``min_samples`` samples serving one of its models (engines with an
    unknown model list are peers of each other). Pure; no peers, not slow."""
    groups: dict[str, list[LatencyView]] = {}
    for view in views:
        if view.healthy and view.ttft_s is not None and view.samples >= min_samples:
            for model in view.models or ("",):
                groups.setdefault(model, []).append(view)
    slow: set[str] = set()
    for group in groups.values():
        for view in group:
            peers = [p.ttft_s for p in group if p is not view and p.ttft_s is not None]
            if peers and view.ttft_s is not None:
                if view.ttft_s > factor * statistics.median(peers):
                    slow.add(view.id)
    return frozenset(slow)


class SlowDetector:
    """Which engines are slow now, with a trial after ``slow_hold_s`` (module docstring).

    Example: ``slow = detector.update(views)`` every ``slow_check_s``.
    """

    __slots__ = ("_clock", "_marked", "_settings", "_trial")

    def __init__(self, settings: OutlierSettings, *, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._marked: dict[str, float] = {}  # slow engine -> when it was marked
        self._trial: dict[str, int] = {}  # engine on trial -> its samples when released

    @property
    def slow(self) -> frozenset[str]:
        return frozenset(self._marked)

    def update(self, views: Iterable[LatencyView]) -> frozenset[str]:
        """Re-judge every engine from ``views``; returns the slow ones."""
        views = list(views)
        settings = self._settings
        need = settings.slow_min_samples
        candidates = slow_candidates(views, factor=settings.slow_factor, min_samples=need)
        now = self._clock()
        samples = {view.id: view.samples for view in views}
        for eid in list(self._marked):
            if eid not in candidates:
                del self._marked[eid]
            elif now - self._marked[eid] >= settings.slow_hold_s:
                del self._marked[eid]  # a trial: traffic again, fresh samples
                self._trial[eid] = samples[eid]
        for eid in list(self._trial):
            if eid not in samples or eid not in candidates:
                del self._trial[eid]
        for eid in candidates:
            if eid in self._marked:
                continue
            released = self._trial.get(eid)
            if released is not None and samples[eid] - released < need:
                continue  # on trial: not enough fresh samples yet
            self._trial.pop(eid, None)
            self._marked[eid] = now
        return frozenset(self._marked)
