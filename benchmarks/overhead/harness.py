"""Pure helpers of the overhead benchmark (no I/O; ``tests/test_overhead_harness.py``):
wrk output parsing, ``/proc/<pid>/stat`` parsing, medians and ratios, combining the direct
runs (one wrk per engine) into one row.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LAT = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


class WrkParseError(ValueError):
    """wrk's output lacks the summary lines (it failed, or ran without ``--latency``)."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """The summary of ``wrk --latency``: totals, req/s, the 50/75/90/99 % latencies (ms),
    non-2xx responses and socket errors."""
    lat = {int(q): float(v) * _UNIT_MS[u] for q, v, u in _LAT.findall(text)}
    rps, total = _RPS.search(text), _TOTAL.search(text)
    if rps is None or total is None or len(lat) != 4:
        raise WrkParseError(f"not a wrk --latency summary: {text[-300:]!r}")
    sock = _SOCK.search(text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    non2xx = _NON2XX.search(text)
    return WrkResult(
        requests=int(total.group(1)),
        duration_s=float(total.group(2)) * _UNIT_MS[total.group(3)] / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=lat[50],
        p75_ms=lat[75],
        p90_ms=lat[90],
        p99_ms=lat[99],
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors={k: v for k, v in socket_errors.items() if v},
    )


def combine_wrk(parts: Sequence[WrkResult]) -> WrkResult:
    """Several wrk processes run side by side (direct: one per engine) as one result: summed
    requests, req/s and errors; latency percentiles weighted by each part's requests (an
    approximation: the exact merged percentile needs the raw samples)."""
    if not parts:
        raise ValueError("no wrk results to combine")
    n = sum(p.requests for p in parts) or 1

    def weighted(attr: str) -> float:
        return float(sum(getattr(p, attr) * p.requests for p in parts)) / n

    errs: dict[str, int] = {}
    for p in parts:
        for k, v in p.socket_errors.items():
            errs[k] = errs.get(k, 0) + v
    return WrkResult(
        requests=sum(p.requests for p in parts),
        duration_s=max(p.duration_s for p in parts),
        rps=sum(p.rps for p in parts),
        p50_ms=weighted("p50_ms"),
        p75_ms=weighted("p75_ms"),
        p90_ms=weighted("p90_ms"),
        p99_ms=weighted("p99_ms"),
        non2xx=sum(p.non2xx for p in parts),
        socket_errors=errs,
    )


def split_connections(total: int, ways: int) -> list[int]:
    """``total`` connections over ``ways`` clients as evenly as possible (32/3 -> 11, 11, 10);
    clients that would get none are dropped (c=1 -> one client)."""
    base, extra = divmod(total, ways)
    return [c for c in (base + (1 if i < extra else 0) for i in range(ways)) if c > 0]


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    pgid: int
    utime: int
    stime: int
    rss_pages: int

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def parse_proc_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name (2nd field) is in parentheses and may
    hold spaces or parentheses itself, so the fields are counted from the last ``)``."""
    pid = int(text.split(" ", 1)[0])
    rest = text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, rss 24.
    return ProcStat(
        pid=pid,
        pgid=int(rest[2]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        rss_pages=int(rest[21]),
    )


def group_totals(stats: Iterable[ProcStat], pgid: int) -> tuple[int, int]:
    """(CPU ticks, RSS pages) summed over the processes of process group ``pgid``."""
    ticks = rss = 0
    for s in stats:
        if s.pgid == pgid:
            ticks += s.cpu_ticks
            rss += s.rss_pages
    return ticks, rss


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not ``None``; ``None`` when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def cpu_us_per_request(cpu_s: float | None, requests: int) -> float | None:
    if cpu_s is None or requests <= 0:
        return None
    return cpu_s * 1e6 / requests


def spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    """(min, max) of the present values: the per-round spread shown next to a median."""
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if vals else None
