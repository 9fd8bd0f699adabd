"""SecondWindow: 1 s buckets, bounded span, averages and maxima over the last N seconds with an
injected clock, gaps as missing data."""

from __future__ import annotations

import pytest

from autoscale.window import SecondWindow


def _filled(samples: list[tuple[float, float]], span: float = 10) -> SecondWindow:
    w = SecondWindow(span)
    for now, value in samples:
        w.record(now, value)
    return w


@pytest.mark.parametrize(
    ("samples", "seconds", "now", "expected"),
    [
        # one sample per second: plain mean of the last N
        ([(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)], 2, 3.0, 3.5),
        ([(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)], 4, 3.0, 2.5),
        # a window longer than the data averages what is there
        ([(0, 1.0), (1, 3.0)], 60, 1.0, 2.0),
        # two samples in one second are averaged first (the bucket's mean)
        ([(0.1, 2.0), (0.9, 4.0), (1.0, 6.0)], 2, 1.5, 4.5),
        # a gap is missing data, not zero
        ([(0, 2.0), (5, 4.0)], 10, 5.0, 3.0),
        # nothing within the last N seconds
        ([(0, 2.0)], 2, 5.0, None),
        # queried "now" earlier than the newest sample: only up to now counts
        ([(0, 2.0), (1, 4.0), (2, 8.0)], 2, 1.0, 3.0),
        # a clock that steps back adds to the newest bucket
        ([(5, 2.0), (3, 4.0)], 3, 5.0, 3.0),
        # no samples at all
        ([], 5, 0.0, None),
        # a non-positive window is empty
        ([(0, 2.0)], 0, 0.0, None),
    ],
)
def test_average(
    samples: list[tuple[float, float]], seconds: float, now: float, expected: float | None
) -> None:
    assert _filled(samples).average(seconds, now=now) == expected


@pytest.mark.parametrize(
    ("samples", "seconds", "now", "expected"),
    [
        ([(0, 1.0), (1, 9.0), (2, 3.0)], 3, 2.0, 9.0),
        ([(0, 1.0), (1, 9.0), (2, 3.0)], 1, 2.0, 3.0),
        # the max is over samples, not bucket means
        ([(0.2, 1.0), (0.7, 7.0)], 1, 0.9, 7.0),
        ([(0, 1.0)], 1, 4.0, None),
    ],
)
def test_maximum(
    samples: list[tuple[float, float]], seconds: float, now: float, expected: float | None
) -> None:
    assert _filled(samples).maximum(seconds, now=now) == expected


def test_span_bounds_memory_and_queries() -> None:
    w = SecondWindow(5)
    for t in range(100):
        w.record(float(t), float(t))
    assert len(w) == 5
    assert w.span_s == 5
    # asking for more than the span sees only the span
    assert w.average(60, now=99.0) == pytest.approx((95 + 96 + 97 + 98 + 99) / 5)
    assert w.count(60, now=99.0) == 5
    assert w.latest() == 99.0


def test_fractional_span_rounds_up_and_invalid_span_rejected() -> None:
    assert SecondWindow(2.5).span_s == 3
    with pytest.raises(ValueError, match="span_s"):
        SecondWindow(0.5)


def test_latest_and_count_when_empty() -> None:
    w = SecondWindow(3)
    assert w.latest() is None
    assert w.count(3, now=0.0) == 0


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([(0, 1.0), (1, 3.0)], 2**0.5),
        ([(0, 2.0), (1, 2.0), (2, 2.0)], 0.0),
        ([(0, 2.0), (5, 4.0), (9, 6.0)], 2.0),  # gaps: over the seconds with samples
        ([(0, 2.0)], None),
    ],
)
def test_deviation(samples: list[tuple[float, float]], expected: float | None) -> None:
    result = _filled(samples).deviation(10, now=9.0)
    assert result == (None if expected is None else pytest.approx(expected))
