"""Requests and tokens arriving at the gateway: counted once per client request, summed
over the gateway replicas, turned into rates.

The gateway calls :meth:`ArrivalCounter.arrived` once per client request admitted into its
serving path, before any admission wait (a few integer additions; only when autoscaling is
enabled; docs/autoscaling.md "Signals" says which requests count), keyed by model and
bounded in the number of models kept. The autoscaler's source reads cumulative totals once
per tick and turns them into per-second rates on its own clock (simulated seconds in the
benchmark), so nothing is reset and no reading is lost between ticks: :class:`RateMeter`
for one series, :class:`FleetRateMeter` for a :class:`FleetReading` -- the cumulative totals
of every live gateway replica (one process: just its own), differenced per replica, so a
replica that appears, disappears or restarts never makes a negative or spiking rate.

Example::

    counter = ArrivalCounter()
    counter.arrived("llama", prompt_tokens=900, max_tokens=128)
    meter = RateMeter()
    meter.rates(counter.totals("llama"), now=1.0)   # (0.0, 0.0, 0.0): the first reading
    FleetRateMeter().rates(counter.read_arrivals("llama"), now=1.0)  # the same, fleet-wide
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from routing.state import DEFAULT_OUTPUT_TOKENS

__all__ = [
    "LOCAL",
    "OTHER_MODELS",
    "ArrivalCounter",
    "ArrivalReader",
    "ArrivalTotals",
    "FleetRateMeter",
    "FleetReading",
    "RateMeter",
    "growth",
    "totals_of",
]

OTHER_MODELS = "__other__"
"""Where arrivals of models beyond ``max_models`` are counted."""
LOCAL = "local"
"""The key of this process's totals in a :class:`FleetReading` of one process."""


@dataclass(frozen=True, slots=True)
class ArrivalTotals:
    """Cumulative counts since the counter was made: ``ArrivalTotals(requests=3)``."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0


NO_ARRIVALS = ArrivalTotals()


def totals_of(by_model: Mapping[str, ArrivalTotals], model: str | None) -> ArrivalTotals:
    """``model``'s totals in ``by_model`` (``None``: the sum over every model)."""
    if model is not None:
        return by_model.get(model, NO_ARRIVALS)
    rows = by_model.values()
    return ArrivalTotals(
        sum(r.requests for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.output_tokens for r in rows),
    )


@dataclass(frozen=True, slots=True)
class FleetReading:
    """Cumulative totals of one model (or all) per gateway replica, read at one moment.

    ``local`` is this process's key in ``totals``; ``replicas`` the live replicas last seen.
    ``estimated``: the other replicas' totals are unknown (shared state unavailable), so
    rates are this replica's x ``replicas``. Example:
    ``FleetReading({"r1": ArrivalTotals(3), "r2": ArrivalTotals(5)}, local="r1", replicas=2)``.
    """

    totals: Mapping[str, ArrivalTotals]
    local: str = LOCAL
    replicas: int = 1
    estimated: bool = False


class ArrivalReader(Protocol):
    """Where the autoscaler reads arrivals: one process's :class:`ArrivalCounter`, or the
    gateway's shared routing state (every replica's totals)."""

    def read_arrivals(self, model: str | None) -> FleetReading: ...


class ArrivalCounter:
    """Cumulative arrivals per model (at most ``max_models`` names; the rest pooled)."""

    __slots__ = ("_by_model", "_max_models")

    def __init__(self, *, max_models: int = 256) -> None:
        self._by_model: dict[str, list[int]] = {}
        self._max_models = max_models

    def arrived(self, model: str, *, prompt_tokens: int, max_tokens: int | None) -> None:
        """One client request arrived: its prompt tokens and its expected output
        (``max_tokens``, else the routing layer's default estimate)."""
        counts = self._by_model.get(model)
        if counts is None:
            if len(self._by_model) >= self._max_models:
                model = OTHER_MODELS
            counts = self._by_model.setdefault(model, [0, 0, 0])
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += DEFAULT_OUTPUT_TOKENS if max_tokens is None else max_tokens

    def totals(self, model: str | None = None) -> ArrivalTotals:
        """Totals of ``model`` (``None``: every model)."""
        if model is not None:
            counts = self._by_model.get(model) or [0, 0, 0]
            return ArrivalTotals(*counts)
        rows = list(self._by_model.values())
        return ArrivalTotals(*(sum(r[i] for r in rows) for i in range(3)))

    def snapshot(self) -> dict[str, ArrivalTotals]:
        """Every model's totals (what a replica publishes to the others)."""
        return {model: ArrivalTotals(*counts) for model, counts in self._by_model.items()}

    def read_arrivals(self, model: str | None) -> FleetReading:
        """This process alone (:class:`ArrivalReader`): no other replica is known."""
        return FleetReading({LOCAL: self.totals(model)})


class RateMeter:
    """Per-second rates between consecutive readings of cumulative totals."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[float, ArrivalTotals] | None = None

    def rates(self, totals: ArrivalTotals, *, now: float) -> tuple[float, float, float]:
        """(requests/s, prompt tokens/s, output tokens/s) since the previous reading; zeros
        on the first reading or when no time passed."""
        last, self._last = self._last, (now, totals)
        if last is None or now <= last[0]:
            return 0.0, 0.0, 0.0
        dt = now - last[0]
        before = last[1]
        return (
            max(0, totals.requests - before.requests) / dt,
            max(0, totals.prompt_tokens - before.prompt_tokens) / dt,
            max(0, totals.output_tokens - before.output_tokens) / dt,
        )


def growth(before: ArrivalTotals | None, after: ArrivalTotals | None) -> ArrivalTotals:
    """What one replica's cumulative totals grew by between two readings, never negative:
    nothing when either reading is missing (a replica seen for the first time is a
    baseline, however large its totals; one that vanished adds nothing), ``after`` itself
    when any total went down (a counter reset: it counts again from zero)."""
    if before is None or after is None:
        return NO_ARRIVALS
    if (
        after.requests < before.requests
        or after.prompt_tokens < before.prompt_tokens
        or after.output_tokens < before.output_tokens
    ):
        return after
    return ArrivalTotals(
        after.requests - before.requests,
        after.prompt_tokens - before.prompt_tokens,
        after.output_tokens - before.output_tokens,
    )


class FleetRateMeter:
    """Per-second rates between consecutive :class:`FleetReading` s, summed over replicas.

    Each replica's totals are differenced on their own (:func:`growth`), so replicas that
    join, leave or restart never make the sum go backwards or jump. While a reading is
    ``estimated``, and for the first reading after one (the replicas that reappear are
    baselines then), the rates are this replica's growth x ``replicas``.
    """

    __slots__ = ("_estimated", "_last")

    def __init__(self) -> None:
        self._last: tuple[float, Mapping[str, ArrivalTotals]] | None = None
        self._estimated = False

    def rates(self, reading: FleetReading, *, now: float) -> tuple[float, float, float]:
        """(requests/s, prompt tokens/s, output tokens/s) since the previous reading; zeros
        on the first reading or when no time passed."""
        last, self._last = self._last, (now, reading.totals)
        was_estimated, self._estimated = self._estimated, reading.estimated
        if last is None or now <= last[0]:
            return 0.0, 0.0, 0.0
        before = last[1]
        if reading.estimated or was_estimated:
            own = growth(before.get(reading.local), reading.totals.get(reading.local))
            scale = max(1, reading.replicas)
            n, prompt, output = own.requests, own.prompt_tokens, own.output_tokens
            n, prompt, output = n * scale, prompt * scale, output * scale
        else:
            n = prompt = output = 0
            for replica, totals in reading.totals.items():
                grew = growth(before.get(replica), totals)
                n += grew.requests
                prompt += grew.prompt_tokens
                output += grew.output_tokens
        dt = now - last[0]
        return n / dt, prompt / dt, output / dt
