"""SLOPolicy (ours, latency headroom): pressure from the engines' p90 TTFT/ITL against the SLO,
proportional bounded scale-up, no cascade while pods start, slow scale-down, a token floor."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscale.policies.slo import REASONS, SLOPolicy, SLOSettings, p90
from autoscale.signals import Decision, EngineSignals, Observation
from tests.autoscale.helpers import pods


def slo(**settings: Any) -> SLOPolicy:
    return SLOPolicy(SLOSettings(**settings))  # TTFT 1 s, ITL 0.1 s


def at(
    now: float,
    current: int,
    pressure: float | None,
    *,
    ready: int | None = None,
    prompt: float = 0.0,
    output: float = 0.0,
    in_flight: int = 1,
) -> Observation:
    """`current` engines whose TTFT is `pressure` x the 1 s SLO (None: no latency reported)."""
    ready = current if ready is None else ready
    engines = pods(ready, ttft=pressure, in_flight=in_flight)
    return Observation(
        now=now,
        current=current,
        ready=ready,
        engines=engines,
        prompt_token_rate=prompt,
        output_token_rate=output,
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1.0], 1.0), ([3.0, 1.0, 2.0], 3.0), ([float(i) for i in range(1, 11)], 9.0)],
)
def test_p90_nearest_rank(values: list[float], expected: float) -> None:
    assert p90(values) == expected


@pytest.mark.parametrize(
    ("engines", "expected"),
    [
        # the worse of TTFT / SLO and ITL / SLO
        ((EngineSignals(id="a", ready=True, ttft_s=0.5, itl_s=0.02),), 0.5),
        ((EngineSignals(id="a", ready=True, ttft_s=0.2, itl_s=0.09),), 0.9),
        # the p90 over engines: of ten, the ninth
        (tuple(EngineSignals(id=f"e{i}", ready=True, ttft_s=i / 10) for i in range(1, 11)), 0.9),
        # engines not ready are left out
        (
            (
                EngineSignals(id="a", ready=True, ttft_s=0.3),
                EngineSignals(id="b", ready=False, ttft_s=9.0),
            ),
            0.3,
        ),
        # nothing reported and nothing in flight: idle, no pressure
        ((EngineSignals(id="a", ready=True),), 0.0),
        # nothing reported under load: unknown
        ((EngineSignals(id="a", ready=True, in_flight=3),), None),
    ],
)
def test_pressure(engines: tuple[EngineSignals, ...], expected: float | None) -> None:
    observation = Observation(now=0.0, current=1, ready=1, engines=engines)
    assert slo().pressure(observation) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("pressure", "current", "desired", "reason"),
    [
        (0.5, 4, 4, "hold"),  # inside the band
        (0.8, 4, 4, "hold"),  # at the band's edge
        (0.9, 4, 6, "scale_up"),  # ceil(4 x 0.9 / 0.6)
        (1.2, 4, 8, "scale_up"),  # 2x, the bound
        (5.0, 4, 8, "scale_up"),  # still at most 2x
        (0.85, 10, 15, "scale_up"),  # ceil(10 x 1.417) = 15
        (0.81, 1, 2, "scale_up"),  # at least one more
    ],
)
def test_scale_up_proportional_and_bounded(
    pressure: float, current: int, desired: int, reason: str
) -> None:
    decision = slo().decide(at(0.0, current, pressure))
    assert (decision.desired, decision.reason) == (desired, reason)
    assert decision.reason in REASONS


def test_waits_for_pending_pods_and_then_lets_queues_settle() -> None:
    policy = slo()
    assert policy.decide(at(0.0, 4, 1.2)).desired == 8
    # the 4 new pods start for 60 s; latency stays over the SLO meanwhile
    for t in range(1, 61):
        decision = policy.decide(at(float(t), 8, 1.2, ready=4))
        assert (decision.desired, decision.reason) == (8, "pending")
    # ready at t = 61: 15 s to settle before latency is read again
    for t in range(61, 76):
        decision = policy.decide(at(float(t), 8, 1.2))
        assert (decision.desired, decision.reason) == (8, "settling")
    assert policy.decide(at(76.0, 8, 1.2)).desired == 16


def test_scale_down_one_pod_per_interval_after_a_calm_stabilisation_window() -> None:
    policy = slo()
    current = 5
    changes: dict[int, int] = {}
    for t in range(0, 300):
        decision = policy.decide(at(float(t), current, 0.1))
        if decision.desired != current:
            changes[t] = decision.desired
            assert decision.reason == "scale_down"
        else:
            assert decision.reason in {"stabilising", "hold"}
        current = decision.desired
    assert changes == {180: 4, 210: 3, 240: 2, 270: 1}


def test_no_scale_down_while_pods_are_pending_or_latency_was_high_lately() -> None:
    policy = slo()
    for t in range(0, 200):
        policy.decide(at(float(t), 5, 0.1))
    assert policy.decide(at(200.0, 5, 0.1, ready=4)).reason == "pending"
    policy.decide(at(201.0, 5, 0.5))  # one second at 0.5 >= the 0.3 down band
    assert policy.decide(at(202.0, 5, 0.1)).reason == "hold"


def test_unknown_pressure_holds() -> None:
    decision = slo().decide(at(0.0, 3, None))
    assert (decision.desired, decision.reason) == (3, "hold")


def _demand_policy(**settings: Any) -> SLOPolicy:
    # 1,000 prompt tokens/s per engine; no lead time (no backlog projection) unless asked
    settings.setdefault("lead_time_s", 0.0)
    return slo(prompt_tokens_per_s=1000.0, output_tokens_per_s=100.0, **settings)


def test_token_demand_leads() -> None:
    policy = _demand_policy()
    # 4,000 prompt + 180 output tokens/s = 5.8 engines; latency fine. One second is no
    # evidence of a level (the proactive policy's rule); the next: ceil(5.8 / 0.85) = 7
    first = policy.decide(at(0.0, 3, 0.1, prompt=4000.0, output=180.0))
    assert (first.desired, first.reason) == (3, "hold")
    decision = policy.decide(at(1.0, 3, 0.1, prompt=4000.0, output=180.0))
    assert (decision.desired, decision.reason) == (7, "demand")


def test_latency_over_the_band_adds_to_the_demand() -> None:
    policy = _demand_policy()
    policy.decide(at(0.0, 4, 1.2, prompt=5800.0))
    decision = policy.decide(at(1.0, 4, 1.2, prompt=5800.0))
    assert (decision.desired, decision.reason) == (8, "scale_up")  # 2x 4 > the demand's 7
    small = _demand_policy()
    small.decide(at(0.0, 4, 0.9, prompt=8000.0))
    decision = small.decide(at(1.0, 4, 0.9, prompt=8000.0))
    assert (decision.desired, decision.reason) == (10, "scale_up")  # demand 10 > 1.5 x 4


def test_demand_still_scales_up_while_latency_waits_for_pending_pods() -> None:
    policy = _demand_policy()
    policy.decide(at(0.0, 4, 1.2, ready=2, prompt=1000.0))
    decision = policy.decide(at(1.0, 4, 1.2, ready=2, prompt=1000.0))
    assert (decision.desired, decision.reason) == (4, "pending")  # demand 2 engines: enough
    decision = policy.decide(at(2.0, 4, 1.2, ready=2, prompt=8000.0))
    # a burst: the last second's 8 engines at over 2x the average, ceil(8 / 0.85) = 10
    assert (decision.desired, decision.reason) == (10, "demand")


@pytest.mark.parametrize(
    ("pressure", "first_down"),
    [(0.1, 180), (0.5, None)],  # calm latency lets the token model scale down; 0.5 does not
)
def test_the_token_models_scale_down_waits_for_calm_latency(
    pressure: float, first_down: int | None
) -> None:
    policy = _demand_policy()
    current = 10
    downs = []
    for t in range(0, 400):
        decision = policy.decide(at(float(t), current, pressure, prompt=1000.0))
        if decision.desired < current:
            downs.append(t)
            assert decision.reason == "scale_down"
        current = decision.desired
    assert (downs[0] if downs else None) == first_down
    if first_down is not None:
        assert current == 2  # ceil(1 / 0.8): the token model's own floor


def test_stale_holds() -> None:
    stale = Observation(now=0.0, current=3, ready=3, stale=True)
    assert slo().decide(stale) == Decision(desired=3, reason="stale")


@pytest.mark.parametrize(
    "settings",
    [
        {"down_pressure": 0.7},
        {"up_pressure": 0.5},
        {"prompt_tokens_per_s": 1000.0},
        {"output_tokens_per_s": 100.0},
    ],
)
def test_settings_validation(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SLOSettings(**settings)
