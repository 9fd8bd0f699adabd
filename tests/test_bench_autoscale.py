"""The autoscaling benchmark's pure parts: traces (seeded, rates right) and its metrics."""

from __future__ import annotations

import pytest

from autoscale.clock import ScaledClock, WallClock
from autoscale.settings import AutoscalingSettings
from benchmarks.autoscale.contenders import NAMES, Capacity, prefill_tokens_per_s
from benchmarks.autoscale.loadgen import LoadResult
from benchmarks.autoscale.metrics import (
    ReplicaSample,
    RequestOutcome,
    Slo,
    attainment,
    first_increase_after,
    ready_after,
    replica_seconds,
    reversals,
    scale_events,
)
from benchmarks.autoscale.timing import predicted
from benchmarks.autoscale.traces import TRACES, build_trace
from gateway.autoscaling import _clock_for


def _count(trace_name: str, lo: float, hi: float, **knobs: float) -> float:
    trace = build_trace(trace_name, seed=3, **knobs)
    return sum(1 for r in trace.requests if lo <= r.at_s < hi) / (hi - lo)


@pytest.mark.parametrize("name", TRACES)
def test_traces_are_seeded(name: str) -> None:
    a = build_trace(name, seed=5, duration_s=300.0)
    assert a == build_trace(name, seed=5, duration_s=300.0)
    assert a.requests != build_trace(name, seed=6, duration_s=300.0).requests
    times = [r.at_s for r in a.requests]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 300.0


def test_step_rates_and_shape() -> None:
    knobs = {"duration_s": 3000.0, "base_rps": 2.0, "step_at_s": 1000.0, "step_end_s": 2000.0}
    # Poisson counts over 1000 s: sd ~ 1.4 % (base) and 0.8 % (3x); 5 % bounds hold for seed 3.
    assert _count("step", 0, 1000, **knobs) == pytest.approx(2.0, rel=0.05)
    assert _count("step", 1000, 2000, **knobs) == pytest.approx(6.0, rel=0.05)
    assert _count("step", 2000, 3000, **knobs) == pytest.approx(2.0, rel=0.05)
    trace = build_trace("step", seed=3, **knobs)
    assert trace.load_steps == (1000.0,)
    assert trace.rate_at(999.0) == 2.0 and trace.rate_at(1000.0) == 6.0 and trace.peak_rps == 6.0


def test_diurnal_trough_and_peak() -> None:
    knobs = {"duration_s": 4000.0, "base_rps": 2.0, "amplitude": 0.5}
    trace = build_trace("diurnal", seed=3, **knobs)
    assert trace.rate_at(0.0) == pytest.approx(1.0)
    assert trace.rate_at(2000.0) == pytest.approx(3.0)
    assert _count("diurnal", 1800, 2200, **knobs) == pytest.approx(3.0, rel=0.12)
    assert _count("diurnal", 0, 200, **knobs) == pytest.approx(1.0, rel=0.25)


def test_bursty_mmpp_states_and_rates() -> None:
    knobs = {"duration_s": 3000.0, "base_rps": 1.0, "burst_factor": 4.0}
    trace = build_trace("bursty", seed=3, **knobs)
    rates = {r for _, r in trace.segments}
    assert rates == {1.0, 4.0}
    assert trace.load_steps and all(trace.rate_at(t) == 4.0 for t in trace.load_steps)
    burst = [
        (s, e)
        for (s, r), (e, _) in zip(trace.segments, trace.segments[1:], strict=False)
        if r == 4.0
    ]
    span = sum(e - s for s, e in burst)
    arrivals = sum(1 for q in trace.requests for s, e in burst if s <= q.at_s < e)
    assert arrivals / span == pytest.approx(4.0, rel=0.1)


def test_mix_shifts_sizes_not_rate() -> None:
    knobs = {"duration_s": 3000.0, "base_rps": 2.0, "step_at_s": 1000.0, "step_end_s": 2000.0}
    trace = build_trace("mix", seed=3, **knobs)
    low = [r for r in trace.requests if r.at_s < 1000]
    high = [r for r in trace.requests if 1000 <= r.at_s < 2000]
    assert len(high) / len(low) == pytest.approx(1.0, rel=0.1)
    assert sum(r.kind == "long" for r in low) / len(low) == pytest.approx(0.1, abs=0.03)
    assert sum(r.kind == "long" for r in high) / len(high) == pytest.approx(0.5, abs=0.05)


def test_standard_sizes_within_bounds() -> None:
    trace = build_trace("step", seed=1, duration_s=2000.0)
    prompts = [r.prompt_tokens for r in trace.requests]
    assert min(prompts) >= 256 and max(prompts) <= 7000
    assert sum(prompts) / len(prompts) == pytest.approx(3000, rel=0.05)
    assert all(16 <= r.max_tokens <= 48 for r in trace.requests)


def test_unknown_trace_and_knob() -> None:
    with pytest.raises(ValueError, match="unknown trace"):
        build_trace("sawtooth", seed=1)
    with pytest.raises(ValueError, match="unknown trace knobs"):
        build_trace("step", seed=1, nope=1.0)


@pytest.mark.parametrize(
    ("desired", "events", "revs"),
    [
        ([], 0, 0),
        ([2, 2, 2], 0, 0),
        ([1, 2, 3, 3, 4], 3, 0),
        ([1, 3, 2], 2, 1),
        ([1, 3, 2, 4, 4, 1], 4, 3),
        ([4, 3, 2, 1], 3, 0),
    ],
)
def test_scale_events_and_reversals(desired: list[int], events: int, revs: int) -> None:
    assert scale_events(desired) == events
    assert reversals(desired) == revs


def test_replica_seconds_integrates_a_step_function() -> None:
    samples = [ReplicaSample(0, 1, 1, 1), ReplicaSample(10, 3, 1, 3), ReplicaSample(15, 3, 3, 2)]
    assert replica_seconds(samples, end_s=20) == pytest.approx(10 * 1 + 5 * 3 + 5 * 2)
    assert replica_seconds(samples, end_s=20, start_s=12) == pytest.approx(3 * 3 + 5 * 2)
    assert replica_seconds(list(reversed(samples)), end_s=12) == pytest.approx(10 + 2 * 3)
    assert replica_seconds([], end_s=5) == 0.0


def test_attainment_needs_both_slos_and_honours_exclusions() -> None:
    slo = Slo(ttft_s=2.0, itl_s=0.05)
    outs = [
        RequestOutcome(0.0, 1.0, 0.02, True),  # meets
        RequestOutcome(1.0, 3.0, 0.02, True),  # TTFT miss
        RequestOutcome(2.0, 1.0, 0.08, True),  # ITL miss
        RequestOutcome(3.0, None, None, False),  # failed
        RequestOutcome(10.0, 0.5, None, True),  # one token: no ITL, meets
    ]
    assert attainment(outs, slo) == pytest.approx(2 / 5)
    assert attainment(outs, slo, exclude=[(1.0, 4.0)]) == pytest.approx(1.0)
    assert attainment([], slo) is None


def test_first_decision_and_ready_capacity() -> None:
    samples = [ReplicaSample(t, d, r, d) for t, d, r in
               [(0, 1, 1), (5, 1, 1), (11.5, 2, 1), (12, 3, 1), (140, 3, 3)]]  # fmt: skip
    assert first_increase_after(samples, 10.0) == pytest.approx(1.5)
    assert first_increase_after(samples, 13.0) is None
    assert ready_after(samples, 10.0, 3) == pytest.approx(130.0)
    assert ready_after(samples, 10.0, 4) is None


def test_load_result_outcome_in_simulated_seconds() -> None:
    r = LoadResult(at_s=3.0, prompt_tokens=10, max_tokens=5, kind="standard", sent_wall=1.0,
                   first_wall=1.1, last_wall=1.14, tokens=5, status=200)  # fmt: skip
    o = r.outcome(speed=5.0)
    assert o.ok and o.ttft_s == pytest.approx(0.5) and o.itl_s == pytest.approx(0.05)
    short = LoadResult(3.0, 10, 5, "standard", 1.0, 1.1, 1.1, tokens=2, status=200)
    assert not short.outcome(5.0).ok  # fewer tokens than asked: cut off


def test_capacity_and_profile_helpers() -> None:
    cap = Capacity(rps=2.0)
    assert [cap.needed(r) for r in (0.0, 1.6, 2.0, 4.8)] == [1, 1, 1, 3]
    assert 8000 < prefill_tokens_per_s("llama3-8b-a100-bench") < 10000
    ttft, itl = predicted("llama3-8b-a100-bench", 1024, 8)
    assert ttft > 2 * 0.0098 and 0.0098 < itl < 0.012
    assert len(NAMES) == 7


def test_time_scale_gives_the_autoscaler_a_scaled_clock() -> None:
    assert isinstance(_clock_for(AutoscalingSettings()), WallClock)
    clock = _clock_for(AutoscalingSettings(time_scale=5.0))
    assert isinstance(clock, ScaledClock) and clock.speed == 5.0
