"""Arrival rates summed over gateway replicas: per-replica growth with counter resets, replicas
that appear, vanish or restart, and estimated readings (pure tables, no clock but ``now``)."""

from __future__ import annotations

import pytest

from autoscale.arrivals import (
    LOCAL,
    OTHER_MODELS,
    ArrivalCounter,
    ArrivalTotals,
    FleetRateMeter,
    FleetReading,
    growth,
    totals_of,
)

T = ArrivalTotals


@pytest.mark.parametrize(
    ("before", "after", "grew"),
    [
        (None, T(5, 500, 50), T()),  # first sighting: a baseline, however large
        (T(5, 500, 50), None, T()),  # vanished: adds nothing, never negative
        (None, None, T()),
        (T(5, 500, 50), T(5, 500, 50), T()),  # idle
        (T(5, 500, 50), T(8, 800, 80), T(3, 300, 30)),
        (T(5, 500, 50), T(2, 200, 20), T(2, 200, 20)),  # reset: counts again from zero
        (T(5, 500, 50), T(6, 400, 60), T(6, 400, 60)),  # any total going down is a reset
        (T(5, 500, 50), T(0, 0, 0), T()),  # reset to nothing yet
    ],
)  # fmt: skip
def test_growth(before: T | None, after: T | None, grew: T) -> None:
    assert growth(before, after) == grew


def _reading(totals: dict[str, T], estimated: bool = False, replicas: int = 1) -> FleetReading:
    return FleetReading(totals, local="a", replicas=replicas, estimated=estimated)


# Each row: readings at t = 0, 1, 2, ... (one second apart) and the request rates after each.
# Tokens follow requests x 100 (prompt) and x 10 (output) in every row.
@pytest.mark.parametrize(
    ("readings", "rates"),
    [
        # two replicas: the sum of both
        ([{"a": 0, "b": 0}, {"a": 3, "b": 5}, {"a": 4, "b": 9}], [0, 8, 5]),
        # a replica joins with large totals (up for hours, or after a gap): a baseline
        ([{"a": 10}, {"a": 12, "b": 1000}, {"a": 14, "b": 1003}], [0, 2, 5]),
        # a replica leaves: its arrivals stop counting, the others' still do (no negative)
        ([{"a": 10, "b": 100}, {"a": 12, "b": 104}, {"a": 15}], [0, 6, 3]),
        # a replica restarts under the same id: counted from zero again, no negative, no spike
        ([{"a": 10, "b": 100}, {"a": 12, "b": 3}, {"a": 13, "b": 7}], [0, 5, 5]),
        # a replica restarts under a new id (the usual case): a new baseline
        ([{"a": 10, "b": 100}, {"a": 12, "c": 3}, {"a": 13, "c": 7}], [0, 2, 5]),
        # a replica missing from one reading comes back: a baseline again, not a burst
        ([{"a": 0, "b": 0}, {"a": 1}, {"a": 2, "b": 50}, {"a": 3, "b": 51}], [0, 1, 1, 2]),
    ],
)  # fmt: skip
def test_fleet_rates(readings: list[dict[str, int]], rates: list[float]) -> None:
    meter = FleetRateMeter()
    got = []
    for t, reading in enumerate(readings):
        totals = {rid: T(n, n * 100, n * 10) for rid, n in reading.items()}
        requests, prompt, output = meter.rates(_reading(totals), now=float(t))
        assert (prompt, output) == (requests * 100, requests * 10)
        got.append(requests)
    assert got == rates


@pytest.mark.parametrize(
    ("readings", "rates"),
    [
        # Redis down at t=2 (this replica alone, x 3 live replicas last seen), back at t=4:
        # the first reading after an estimate is estimated too (the others are baselines)
        ([(False, {"a": 0, "b": 0, "c": 0}), (False, {"a": 1, "b": 2, "c": 3}),
          (True, {"a": 3}), (True, {"a": 4}), (False, {"a": 6, "b": 90, "c": 90}),
          (False, {"a": 7, "b": 92, "c": 93})],
         [0, 6, 6, 3, 6, 6]),
        # estimated from the first reading (no sync yet)
        ([(True, {"a": 0}), (True, {"a": 2}), (False, {"a": 3, "b": 7}),
          (False, {"a": 4, "b": 9})],
         [0, 6, 3, 3]),
    ],
)  # fmt: skip
def test_estimated_readings_scale_this_replica(
    readings: list[tuple[bool, dict[str, int]]], rates: list[float]
) -> None:
    meter = FleetRateMeter()
    got = []
    for t, (estimated, reading) in enumerate(readings):
        totals = {rid: T(n, n * 100, n * 10) for rid, n in reading.items()}
        got.append(meter.rates(_reading(totals, estimated, 3), now=float(t))[0])
    assert got == rates


def test_no_time_passed_and_per_second_rates() -> None:
    meter = FleetRateMeter()
    assert meter.rates(_reading({"a": T(1, 10, 1)}), now=5.0) == (0.0, 0.0, 0.0)
    assert meter.rates(_reading({"a": T(2, 20, 2)}), now=5.0) == (0.0, 0.0, 0.0)  # no time
    assert meter.rates(_reading({"a": T(6, 60, 6), "b": T(9)}), now=7.0) == (2.0, 20.0, 2.0)


def test_the_counter_reads_as_one_replica() -> None:
    counter = ArrivalCounter(max_models=1)
    counter.arrived("a", prompt_tokens=100, max_tokens=10)
    counter.arrived("b", prompt_tokens=7, max_tokens=3)  # beyond max_models: pooled
    assert counter.snapshot() == {"a": T(1, 100, 10), OTHER_MODELS: T(1, 7, 3)}
    assert counter.read_arrivals("a") == FleetReading({LOCAL: T(1, 100, 10)})
    assert counter.read_arrivals(None).totals == {LOCAL: T(2, 107, 13)}
    assert totals_of(counter.snapshot(), None) == counter.totals(None)
    assert totals_of(counter.snapshot(), "zzz") == T()
