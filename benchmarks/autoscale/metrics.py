"""What the autoscaling benchmark reports, computed from recorded samples (pure functions).

Inputs are in simulated seconds: the Deployment's replica samples taken during the run
(:class:`ReplicaSample`: ``spec.replicas``, Ready pods, pods holding a GPU) and the load
generator's per-request outcomes (:class:`RequestOutcome`)::

    replica_seconds([ReplicaSample(0, 1, 1, 1), ReplicaSample(10, 3, 1, 3)], end_s=20)  # 40.0
    reversals([1, 3, 2, 4])  # 2: up, down, up

Definitions (README "Metrics"):

* **replica-seconds** integrate the pods that hold a GPU (starting, Ready or draining) as a
  step function of the samples; GPU-hours = replica-seconds / 3600 (one GPU per pod).
* **scale events** = changes of ``spec.replicas``; **reversals** = changes whose direction
  differs from the previous change's (up then down, or down then up).
* **SLO attainment** = share of requests whose TTFT <= ``ttft_s`` and mean inter-token latency
  <= ``itl_s``; a failed or unfinished request misses. **Where capacity allows**: the same over
  requests that do not arrive within ``cold_start_s + grace_s`` after a load step (no
  autoscaler, however quick, has new pods Ready before then).
* **first decision** = from a load step to the first ``spec.replicas`` increase at or after it;
  **ready capacity** = from the step to the first sample with Ready >= the replicas needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ReplicaSample",
    "RequestOutcome",
    "Slo",
    "attainment",
    "first_increase_after",
    "ready_after",
    "replica_seconds",
    "reversals",
    "scale_events",
]


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """The scale target at simulated time ``t``."""

    t: float
    desired: int  # spec.replicas
    ready: int  # Ready pods
    pods: int  # pods holding a GPU: starting, Ready or draining


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One request, client-side, in simulated seconds (``ttft_s`` None: no first token)."""

    at_s: float
    ttft_s: float | None
    itl_s: float | None  # mean inter-token latency; None with fewer than two tokens
    ok: bool


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request targets: a request meets the SLO when both hold."""

    ttft_s: float = 2.0
    itl_s: float = 0.1

    def met(self, r: RequestOutcome) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s > self.ttft_s:
            return False
        return r.itl_s is None or r.itl_s <= self.itl_s


def replica_seconds(
    samples: Sequence[ReplicaSample], *, end_s: float, start_s: float = 0.0
) -> float:
    """Integral of ``pods`` over [start_s, end_s], each sample holding until the next."""
    total = 0.0
    ordered = sorted(samples, key=lambda s: s.t)
    for i, s in enumerate(ordered):
        nxt = ordered[i + 1].t if i + 1 < len(ordered) else end_s
        lo, hi = max(s.t, start_s), min(nxt, end_s)
        if hi > lo:
            total += s.pods * (hi - lo)
    return total


def _changes(values: Sequence[int]) -> list[int]:
    return [b - a for a, b in zip(values, values[1:], strict=False) if b != a]


def scale_events(desired: Sequence[int]) -> int:
    """How many times the desired replica count changed."""
    return len(_changes(desired))


def reversals(desired: Sequence[int]) -> int:
    """Direction changes among the successive changes of the desired replica count."""
    signs = [1 if d > 0 else -1 for d in _changes(desired)]
    return sum(1 for a, b in zip(signs, signs[1:], strict=False) if a != b)


def attainment(
    outcomes: Sequence[RequestOutcome],
    slo: Slo,
    *,
    exclude: Sequence[tuple[float, float]] = (),
) -> float | None:
    """Share of requests meeting ``slo``, ignoring those arriving inside any ``exclude``
    interval ``[lo, hi)``; None when no request counts."""
    counted = [r for r in outcomes if not any(lo <= r.at_s < hi for lo, hi in exclude)]
    if not counted:
        return None
    return sum(1 for r in counted if slo.met(r)) / len(counted)


def first_increase_after(samples: Sequence[ReplicaSample], t0: float) -> float | None:
    """Seconds from ``t0`` to the first sample at or after it whose ``desired`` exceeds the
    last value before ``t0``; None if it never rises."""
    ordered = sorted(samples, key=lambda s: s.t)
    before = [s.desired for s in ordered if s.t < t0]
    if not before and not ordered:
        return None
    level = before[-1] if before else ordered[0].desired
    for s in ordered:
        if s.t >= t0 and s.desired > level:
            return s.t - t0
    return None


def ready_after(samples: Sequence[ReplicaSample], t0: float, needed: int) -> float | None:
    """Seconds from ``t0`` to the first sample at or after it with ``ready >= needed``."""
    for s in sorted(samples, key=lambda s: s.t):
        if s.t >= t0 and s.ready >= needed:
            return s.t - t0
    return None
