"""Seeded load traces for the autoscaling benchmark (pure: no I/O, no clock).

A trace is an open-loop arrival process in *simulated* seconds: a rate function ``rate(t)``
(requests/s) turned into arrivals by thinning a Poisson process (Lewis & Shedler), and one
request size per arrival. Every contender replays the same :class:`Trace` (same seed, same
arrivals, same sizes), so differences come from the autoscaler alone::

    trace = build_trace("step", seed=1, base_rps=1.6, duration_s=360.0)
    trace.requests[0].at_s, trace.rate_at(100.0), trace.load_steps

Traces (parameters in benchmarks/autoscale/README.md):

* ``step`` -- ``base_rps`` until ``step_at_s``, then ``step_factor`` (3x) x base until
  ``step_end_s``, then base again.
* ``diurnal`` -- a compressed day: ``base_rps * (1 + amplitude * sin(2 pi t / period - pi/2))``,
  from the trough (1 - amplitude) to the peak (1 + amplitude) and back.
* ``bursty`` -- a two-state Markov-modulated Poisson process (MMPP): ``base_rps`` in the calm
  state, ``burst_factor`` x base in bursts; sojourn times exponential with means
  ``calm_mean_s`` / ``burst_mean_s``. The state path is drawn from the seed too.
* ``mix`` -- a constant request rate whose *size* mix shifts: the long-prompt share goes from
  ``long_share_low`` to ``long_share_high`` between ``step_at_s`` and ``step_end_s`` (the token
  load rises ~2.9x while the request rate stays flat, which request-count signals miss).

Request sizes: "standard" prompts are log-normal around ``prompt_mean`` tokens (sigma
``prompt_sigma``, clipped to [``prompt_min``, ``prompt_max``]); outputs uniform in
[``output_min``, ``output_max``]. In ``mix``, "short" prompts are ``short_prompt`` x [0.5, 1.5]
tokens with ``short_output`` outputs and "long" ones ``long_prompt`` x [0.8, 1.2] with
``long_output``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["TRACES", "Trace", "TraceRequest", "TraceSpec", "build_trace"]

TRACES = ("step", "diurnal", "bursty", "mix")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One arrival: simulated offset, prompt and output lengths in tokens, a size class."""

    at_s: float
    prompt_tokens: int
    max_tokens: int
    kind: str = "standard"


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """Every knob of every trace (each trace reads the ones it needs)."""

    duration_s: float = 720.0
    base_rps: float = 1.6
    step_at_s: float = 240.0
    step_end_s: float = 540.0
    step_factor: float = 3.0
    period_s: float = 0.0  # diurnal period; 0: the whole trace
    amplitude: float = 0.6
    burst_factor: float = 3.0
    calm_mean_s: float = 90.0
    burst_mean_s: float = 45.0
    prompt_mean: int = 3000
    prompt_sigma: float = 0.35
    prompt_min: int = 256
    prompt_max: int = 7000
    output_min: int = 16
    output_max: int = 48
    short_prompt: int = 600
    short_output: int = 32
    long_prompt: int = 6000
    long_output: int = 16
    long_share_low: float = 0.1
    long_share_high: float = 0.5


@dataclass(frozen=True, slots=True)
class Trace:
    """A trace's arrivals plus what the report needs to know about its shape."""

    name: str
    seed: int
    spec: TraceSpec
    requests: tuple[TraceRequest, ...]
    segments: tuple[tuple[float, float], ...]
    """Piecewise-constant rate: ``(start_s, rps)``, sorted; the diurnal wave is sampled per s."""
    load_steps: tuple[float, ...] = field(default=())
    """Times where the offered load rises sharply (steps, burst starts): the responsiveness
    and capacity-window metrics are measured from them."""

    def rate_at(self, t: float) -> float:
        """Offered request rate at simulated time ``t`` (requests/s)."""
        rate = 0.0
        for start, rps in self.segments:
            if start > t:
                break
            rate = rps
        return rate

    @property
    def duration_s(self) -> float:
        return self.spec.duration_s

    @property
    def peak_rps(self) -> float:
        return max((rps for _, rps in self.segments), default=0.0)


def _thinned_arrivals(
    rng: random.Random, rate: Callable[[float], float], peak: float, duration_s: float
) -> list[float]:
    """Non-homogeneous Poisson arrivals on [0, duration) by thinning a rate-``peak`` process."""
    if peak <= 0:
        return []
    out: list[float] = []
    t = 0.0
    limit = int(peak * duration_s * 4) + 100  # bounded: far more draws than arrivals expected
    for _ in range(limit):
        t += rng.expovariate(peak)
        if t >= duration_s:
            break
        if rng.random() * peak < rate(t):
            out.append(t)
    return out


def _segments_rate(segments: tuple[tuple[float, float], ...]) -> Callable[[float], float]:
    starts = [s for s, _ in segments]
    rates = [r for _, r in segments]

    def rate(t: float) -> float:
        lo, hi = 0, len(starts)
        while lo < hi:  # bisect_right on starts
            mid = (lo + hi) // 2
            if starts[mid] <= t:
                lo = mid + 1
            else:
                hi = mid
        return rates[lo - 1] if lo else 0.0

    return rate


def _standard_size(rng: random.Random, spec: TraceSpec, at_s: float) -> TraceRequest:
    mu = math.log(spec.prompt_mean) - spec.prompt_sigma**2 / 2  # mean of the lognormal = mean
    prompt = int(rng.lognormvariate(mu, spec.prompt_sigma))
    prompt = min(spec.prompt_max, max(spec.prompt_min, prompt))
    out = rng.randint(spec.output_min, spec.output_max)
    return TraceRequest(at_s=at_s, prompt_tokens=prompt, max_tokens=out)


def _step_segments(spec: TraceSpec) -> tuple[tuple[float, float], ...]:
    high = spec.base_rps * spec.step_factor
    return ((0.0, spec.base_rps), (spec.step_at_s, high), (spec.step_end_s, spec.base_rps))


def _diurnal_segments(spec: TraceSpec) -> tuple[tuple[float, float], ...]:
    period = spec.period_s or spec.duration_s
    return tuple(
        (
            float(t),
            spec.base_rps * (1 + spec.amplitude * math.sin(2 * math.pi * t / period - math.pi / 2)),
        )
        for t in range(int(math.ceil(spec.duration_s)))
    )


def _mmpp_segments(rng: random.Random, spec: TraceSpec) -> tuple[tuple[float, float], ...]:
    segments: list[tuple[float, float]] = []
    t, burst = 0.0, False
    for _ in range(10_000):  # bounded; ends at duration_s long before
        if t >= spec.duration_s:
            break
        rps = spec.base_rps * (spec.burst_factor if burst else 1.0)
        segments.append((t, rps))
        t += rng.expovariate(1.0 / (spec.burst_mean_s if burst else spec.calm_mean_s))
        burst = not burst
    return tuple(segments)


def build_trace(name: str, *, seed: int, **knobs: float) -> Trace:
    """The trace ``name`` (one of :data:`TRACES`) for ``seed``; ``knobs`` override
    :class:`TraceSpec`'s defaults."""
    base = TraceSpec()
    if knobs:
        fields = {f: getattr(base, f) for f in TraceSpec.__dataclass_fields__}
        unknown = set(knobs) - set(fields)
        if unknown:
            raise ValueError(f"unknown trace knobs: {sorted(unknown)}")
        base = TraceSpec(**{**fields, **knobs})
    rng = random.Random(f"{name}:{seed}")
    if name == "step":
        segments = _step_segments(base)
        steps: tuple[float, ...] = (base.step_at_s,)
    elif name == "diurnal":
        segments = _diurnal_segments(base)
        steps = ()
    elif name == "bursty":
        segments = _mmpp_segments(rng, base)
        steps = tuple(
            s for (s, r), (_, prev) in zip(segments[1:], segments, strict=False) if r > prev
        )
    elif name == "mix":
        segments = ((0.0, base.base_rps),)
        steps = (base.step_at_s,)
    else:
        raise ValueError(f"unknown trace {name!r}; choose from {', '.join(TRACES)}")
    rate = _segments_rate(segments)
    peak = max(r for _, r in segments)
    arrivals = _thinned_arrivals(rng, rate, peak, base.duration_s)
    if name == "mix":
        requests = tuple(_mix_size(rng, base, t) for t in arrivals)
    else:
        requests = tuple(_standard_size(rng, base, t) for t in arrivals)
    return Trace(
        name=name, seed=seed, spec=base, requests=requests, segments=segments, load_steps=steps
    )


def _mix_size(rng: random.Random, spec: TraceSpec, at_s: float) -> TraceRequest:
    high = spec.step_at_s <= at_s < spec.step_end_s
    share = spec.long_share_high if high else spec.long_share_low
    if rng.random() < share:
        prompt = int(spec.long_prompt * rng.uniform(0.8, 1.2))
        return TraceRequest(
            at_s=at_s, prompt_tokens=prompt, max_tokens=spec.long_output, kind="long"
        )
    prompt = int(spec.short_prompt * rng.uniform(0.5, 1.5))
    return TraceRequest(at_s=at_s, prompt_tokens=prompt, max_tokens=spec.short_output, kind="short")
