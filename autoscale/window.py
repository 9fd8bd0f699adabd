"""Per-second metric windows: the 1 s buckets every policy averages over (Knative's metric
bucket, AIBrix's observe window, our short/long arrival-rate windows).

A `SecondWindow` keeps one bucket per whole second of the injected clock, each holding the
mean, max and count of the samples recorded in that second, and never more than `span_s`
buckets (older ones are dropped as time moves on), so memory is bounded by the longest window a
policy asks about. Queries take `now` too: "the last N seconds" are the seconds
`floor(now) - N + 1 .. floor(now)`.

Gaps (seconds without a sample: a stale tick, a loop that fell behind) are missing data, not
zeros: averages are over the buckets that hold samples, and a window without any returns None.
A policy that wants "no sample means zero load" records the zero itself.

    w = SecondWindow(span_s=60)
    w.record(10.2, 4.0)
    w.record(11.0, 6.0)
    w.average(60, now=11.0)  # 5.0
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["SecondWindow"]


@dataclass(slots=True)
class _Bucket:
    second: int
    total: float
    count: int
    peak: float

    @property
    def mean(self) -> float:
        return self.total / self.count


class SecondWindow:
    """Bounded 1 s buckets of one metric; see the module docstring for the semantics."""

    def __init__(self, span_s: float) -> None:
        if span_s < 1:
            raise ValueError(f"span_s must be >= 1, got {span_s}")
        self._span = math.ceil(span_s)
        self._buckets: deque[_Bucket] = deque()

    @property
    def span_s(self) -> int:
        return self._span

    def __len__(self) -> int:
        """Buckets held (seconds with at least one sample, within the span)."""
        return len(self._buckets)

    def record(self, now: float, value: float) -> None:
        """Add a sample at `now`. A clock that steps back lands in the newest bucket (the clock
        is meant to be monotonic; this keeps the window bounded and ordered if it is not)."""
        second = math.floor(now)
        last = self._buckets[-1] if self._buckets else None
        if last is not None and second <= last.second:
            last.total += value
            last.count += 1
            last.peak = max(last.peak, value)
        else:
            self._buckets.append(_Bucket(second, value, 1, value))
        self._evict(second)

    def _evict(self, second: int) -> None:
        oldest = second - self._span + 1
        while self._buckets and self._buckets[0].second < oldest:
            self._buckets.popleft()

    def _recent(self, seconds: float, now: float) -> list[_Bucket]:
        if seconds <= 0:
            return []
        newest = math.floor(now)
        oldest = newest - min(math.ceil(seconds), self._span) + 1
        found: list[_Bucket] = []
        for bucket in reversed(self._buckets):  # newest first: short windows stop early
            if bucket.second < oldest:
                break
            if bucket.second <= newest:
                found.append(bucket)
        found.reverse()
        return found

    def average(self, seconds: float, *, now: float) -> float | None:
        """Mean of the per-second means over the last `seconds` (capped at the span), over the
        seconds that hold samples; None when none do."""
        buckets = self._recent(seconds, now)
        if not buckets:
            return None
        return sum(b.mean for b in buckets) / len(buckets)

    def maximum(self, seconds: float, *, now: float) -> float | None:
        """Largest sample over the last `seconds` (capped at the span); None when empty."""
        buckets = self._recent(seconds, now)
        if not buckets:
            return None
        return max(b.peak for b in buckets)

    def count(self, seconds: float, *, now: float) -> int:
        """Seconds with samples over the last `seconds` (how full a window is)."""
        return len(self._recent(seconds, now))

    def latest(self) -> float | None:
        """Mean of the newest bucket, whatever its age; None when empty."""
        return self._buckets[-1].mean if self._buckets else None

    def deviation(self, seconds: float, *, now: float) -> float | None:
        """Sample standard deviation of the per-second means over the last `seconds` (how
        noisy the average is: its standard error is this over sqrt(count)); None with fewer
        than two seconds of samples."""
        buckets = self._recent(seconds, now)
        if len(buckets) < 2:
            return None
        mean = sum(b.mean for b in buckets) / len(buckets)
        return math.sqrt(sum((b.mean - mean) ** 2 for b in buckets) / (len(buckets) - 1))
