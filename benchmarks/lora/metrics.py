"""Pure scoring of one LoRA benchmark run: latency percentiles, throughput, load waits, churn
and how fast newly hot adapters spread.

Inputs are plain records in simulated seconds: :class:`RequestRecord` per request (from the
load generator) and :class:`ResidencySample` per poll of the engines' ``/v1/models`` (which
adapters each engine holds at that instant). Usage::

    s = summarize(records, duration_s=120.0)
    spread = spread_times(samples, ["adapter-25", "adapter-26"], after_s=60.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "RequestRecord",
    "ResidencySample",
    "RunSummary",
    "percentile",
    "residency_changes",
    "spread_times",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the client saw it; ``load_wait_s`` set when it waited for a load."""

    at_s: float
    adapter: str
    ttft_s: float | None
    itl_s: float | None
    tokens: int
    ok: bool
    load_wait_s: float | None = None
    error: str | None = None
    retries: int = 0


@dataclass(frozen=True, slots=True)
class ResidencySample:
    """Which adapters each engine held at simulated time ``t_s`` (a ``/v1/models`` poll)."""

    t_s: float
    engines: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class RunSummary:
    requests: int
    ok: int
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    tok_s: float
    waited: int  # requests that waited for an adapter load
    wait_p50_s: float
    wait_max_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    records: Sequence[RequestRecord], *, duration_s: float, timeout_ttft_s: float = math.inf
) -> RunSummary:
    """Percentiles over all requests: a failed request counts with TTFT ``timeout_ttft_s``
    (infinite by default), so failures push p99 up instead of vanishing from it."""
    ttfts = [r.ttft_s if (r.ok and r.ttft_s is not None) else timeout_ttft_s for r in records]
    itls = [r.itl_s for r in records if r.ok and r.itl_s is not None]
    waits = [r.load_wait_s for r in records if r.load_wait_s is not None]
    tokens = sum(r.tokens for r in records)
    return RunSummary(
        requests=len(records),
        ok=sum(1 for r in records if r.ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        tok_s=tokens / duration_s if duration_s > 0 else 0.0,
        waited=len(waits),
        wait_p50_s=percentile(waits, 50) if waits else 0.0,
        wait_max_s=max(waits, default=0.0),
    )


def residency_changes(samples: Sequence[ResidencySample]) -> tuple[int, int]:
    """(loads, unloads) seen between consecutive polls (a load and unload between two polls
    is invisible: a lower bound, used to cross-check the routers' own counts)."""
    loads = unloads = 0
    for prev, cur in zip(samples, samples[1:], strict=False):
        for engine in set(prev.engines) | set(cur.engines):
            before = prev.engines.get(engine, frozenset())
            after = cur.engines.get(engine, frozenset())
            loads += len(after - before)
            unloads += len(before - after)
    return loads, unloads


def spread_times(
    samples: Iterable[ResidencySample],
    adapters: Sequence[str],
    *,
    after_s: float,
    min_engines: int = 2,
) -> dict[str, float | None]:
    """Per adapter: simulated seconds from ``after_s`` until the first poll showing it on at
    least ``min_engines`` engines (``None``: never within the samples)."""
    out: dict[str, float | None] = dict.fromkeys(adapters)
    for s in samples:
        if s.t_s < after_s:
            continue
        for a in adapters:
            if out[a] is None and sum(1 for held in s.engines.values() if a in held) >= (
                min_engines
            ):
                out[a] = s.t_s - after_s
    return out
