"""ProactivePolicy (ours, token demand): reacts on the first tick of a 3x step, no cascade while
pods are pending, no scale-down in a burst, slow scale-down with hysteresis, trend forecast."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from autoscale.policies.proactive import REASONS, ProactivePolicy, ProactiveSettings
from autoscale.signals import Decision, EngineSignals, Observation
from tests.autoscale.helpers import pods

# 1,000 prompt tokens/s per engine: a demand of d engines is d x 1,000 prompt tokens/s
CAPACITY = 1000.0


def proactive(**settings: Any) -> ProactivePolicy:
    settings.setdefault("prompt_tokens_per_s", CAPACITY)
    settings.setdefault("output_tokens_per_s", 100.0)
    settings.setdefault("target_utilisation", 0.8)
    settings.setdefault("hysteresis", 0.2)
    return ProactivePolicy(ProactiveSettings(**settings))


def at(
    now: float,
    current: int,
    demand: float,
    *,
    ready: int | None = None,
    rate: float = 0.0,
    engines: tuple[EngineSignals, ...] = (),
    stale: bool = False,
) -> Observation:
    return Observation(
        now=now,
        current=current,
        ready=current if ready is None else ready,
        engines=engines,
        arrival_rate=rate,
        prompt_token_rate=demand * CAPACITY,
        stale=stale,
    )


def world(
    policy: ProactivePolicy,
    demand: Callable[[int], float],
    seconds: range,
    current: int,
    *,
    rate: Callable[[int], float] = lambda t: 0.0,
) -> tuple[dict[int, Decision], dict[int, int]]:
    """A cluster that applies each decision at once (pods ready immediately)."""
    decisions: dict[int, Decision] = {}
    replicas: dict[int, int] = {}
    for t in seconds:
        replicas[t] = current
        decisions[t] = policy.decide(at(float(t), current, demand(t), rate=rate(t)))
        current = decisions[t].desired
    return decisions, replicas


def test_demand_counts_prompt_and_output_tokens_against_their_capacities() -> None:
    policy = proactive()
    observation = Observation(
        now=0.0, current=1, ready=1, prompt_token_rate=500.0, output_token_rate=150.0
    )
    assert policy.demand(observation) == pytest.approx(0.5 + 1.5)


@pytest.mark.parametrize("rate", [0.0, 40.0])  # without request counts, and at 40 req/s
def test_reacts_on_the_first_tick_of_a_3x_step(rate: float) -> None:
    policy = proactive()
    # 4 engines of demand for a minute on ceil(4 / 0.8) = 5 replicas, then 3x at t = 60
    decisions, _ = world(
        policy,
        lambda t: 4.0 if t < 60 else 12.0,
        range(0, 62),
        5,
        rate=lambda t: rate if t < 60 else 3 * rate,
    )
    assert all(decisions[t].desired == 5 for t in range(0, 60))
    step = decisions[60]
    # a burst on its first second: the CUSUM at 40 req/s (12 engines since it began, shrunk
    # by 1 - 1.5 / sqrt(120 requests): 10.36), or without counts the last second's tokens at
    # 2x the minute's (12). Plus the backlog when new pods are ready: the ready 5 fall short by
    # (level - 5) for the 150 s lead time, to clear in 30 s.
    level = 10.357 if rate else 12.0
    expected = math.ceil((level + (level - 5) * 150 / 30) / 0.8)
    assert (step.desired, step.reason) == (expected, "scale_up")
    assert expected == (47 if rate else 59)
    assert decisions[61].desired == expected  # asked once
    assert step.reason in REASONS


def test_a_burst_on_few_requests_asks_for_little_until_more_confirm_it() -> None:
    policy = proactive(lead_time_s=0.0)
    # 1.6 req/s (1 engine of demand on 2 replicas at 0.8), 3x from t = 60
    decisions, replicas = world(
        policy,
        lambda t: 1.0 if t < 60 else 3.0,
        range(0, 100),
        2,
        rate=lambda t: 1.6 if t < 60 else 4.8,
    )
    assert all(decisions[t].desired == 2 for t in range(0, 62))
    # the CUSUM fires at t = 62 on 14.4 requests: 3 x (1 - 1.5 / sqrt(14.4)) = 1.81 -> 3
    assert (decisions[62].desired, decisions[62].reason) == (3, "scale_up")
    # more requests, a tighter bound: 4 (= ceil(3 / 0.8)) once N > 56, t >= 72
    desired = [decisions[t].desired for t in range(62, 100)]
    assert desired == sorted(desired) and desired[-1] == 4
    assert replicas[74] == 4


@pytest.mark.parametrize(
    ("base", "detected_at"),
    [
        # CUSUM increments on a 3x step: 3 base x ln 2 - base = 1.08 base per second
        (20.0, 60),  # 21.6 >= 5 on the first tick
        (5.0, 60),  # 5.4
        (1.6, 62),  # 1.73, 3.46, 5.2
    ],
)
def test_cusum_detects_a_3x_step_in_request_counts(base: float, detected_at: int) -> None:
    policy = proactive()
    seen = []
    for t in range(0, 70):
        rate = base if t < 60 else 3 * base
        policy.decide(at(float(t), 50, 1.0 if t < 60 else 3.0, rate=rate))
        seen.append(policy.bursting)
    assert seen.index(True) == detected_at


def test_cusum_false_alarms_on_poisson_noise_are_rare() -> None:
    rng = random.Random(7)

    def poisson(mean: float) -> int:
        # counting exponential gaps within one second
        count, elapsed = 0, rng.expovariate(mean)
        while elapsed < 1.0:
            count, elapsed = count + 1, elapsed + rng.expovariate(mean)
        return count

    policy = proactive()
    alarms, previous = 0, False
    for t in range(0, 3600):  # an hour at 5 req/s, nothing but noise
        n = poisson(5.0)
        policy.decide(at(float(t), 50, n / 5.0, rate=float(n)))
        alarms += policy.bursting and not previous
        previous = policy.bursting
    assert alarms <= 12  # about 5 an hour expected at threshold 5


def test_pending_pods_count_as_supply_and_the_queue_does_not_cascade() -> None:
    # 12 engines of demand, 10 ready, 5 starting since t = 0 (lead time 150 s): the queue
    # grows by the 2 engines the ready ones cannot serve, 2,000 prompt tokens a second
    policy = proactive()
    decisions = {}
    current = 15
    for t in range(0, 60):
        queued = (EngineSignals(id="p", ready=True, queued_prompt_tokens=2000 * t),)
        decisions[t] = policy.decide(at(float(t), current, 12.0, ready=10, engines=queued))
        current = decisions[t].desired
    # t = 0: one second is no evidence of a level; t = 1: queued 2 engine-s now + 2 x 149 s
    # until the starting pods are ready = 300 engine-s to clear in 30 s: ceil(22 / 0.8) = 28
    assert (decisions[0].desired, decisions[0].reason) == (15, "pending")
    assert (decisions[1].desired, decisions[1].reason) == (28, "scale_up")
    # then the queue grows by what the time left shrinks by: the same 28, asked once
    assert {(d.desired, d.reason) for t, d in decisions.items() if t > 1} == {(28, "pending")}


def test_no_scale_down_during_a_burst() -> None:
    policy = proactive(down_stabilisation_s=10.0, down_interval_s=0.0)
    # over-provisioned (20 for 1 engine of demand) long enough to be scaling down
    for t in range(0, 100):
        policy.decide(at(float(t), 20, 1.0))
    calm = policy.decide(at(100.0, 20, 1.0))
    assert calm.reason == "scale_down"
    burst = policy.decide(at(101.0, 20, 3.0))  # 2 s window at 2x the minute's average
    assert (burst.desired, burst.reason) == (20, "burst")


def test_no_scale_down_while_pods_are_pending() -> None:
    policy = proactive(down_stabilisation_s=10.0)
    for t in range(0, 20):
        policy.decide(at(float(t), 20, 1.0, ready=20))
    decision = policy.decide(at(20.0, 20, 1.0, ready=18))
    assert (decision.desired, decision.reason) == (20, "pending")


def test_scales_down_slowly_after_the_stabilisation_window_and_keeps_the_hysteresis() -> None:
    policy = proactive()  # 180 s window, 25 % per 15 s
    decisions, replicas = world(policy, lambda t: 4.0, range(0, 400), 10)
    # 4 engines over 0.8 - 0.2: the scale-down target is ceil(4 / 0.6) = 7 (not 5)
    assert {decisions[t].reason for t in range(0, 180)} <= {"stabilising"}
    assert (decisions[180].desired, decisions[180].reason) == (8, "scale_down")  # 10 - 2
    assert (decisions[195].desired, decisions[195].reason) == (7, "scale_down")  # floor at 7
    assert {d.desired for t, d in decisions.items() if t > 195} == {7}
    assert replicas[399] == 7
    assert {decisions[t].reason for t in range(181, 195)} == {"stabilising"}


def test_one_pod_at_a_time_below_four_replicas() -> None:
    policy = proactive(down_stabilisation_s=5.0, down_interval_s=5.0)
    decisions, replicas = world(policy, lambda t: 0.0, range(0, 30), 3)
    assert [replicas[t] for t in (5, 6, 11, 16, 21)] == [3, 2, 1, 0, 0]
    assert decisions[20].reason == "hold"


def test_trend_forecasts_a_ramp_over_the_lead_time() -> None:
    policy = proactive()
    ramp = [1.0 + 0.01 * t for t in range(0, 301)]
    for t, demand in enumerate(ramp):
        decision = policy.decide(at(float(t), 6, demand))
    # halves of 120 s: (avg 181..300 - avg 61..180) / 120 = 0.01 per second
    assert policy.slope(300.0) == pytest.approx(0.01)
    # level: the 20 s mean 3.905 less 1.5 standard errors (0.019); + 0.01 x 150 s = 5.386
    # (within the 6 ready: no backlog) -> ceil(5.386 / 0.8) = 7
    assert (decision.desired, decision.reason) == (7, "scale_up")


def test_trend_is_capped_and_off_after_a_burst_and_without_history() -> None:
    policy = proactive(trend_cap=0.1)
    assert policy.slope(0.0) == 0.0  # no history
    for t in range(0, 301):
        decision = policy.decide(at(float(t), 5, 1.0 + 0.01 * t))
    # the trend adds at most 10 % of the level: ceil(3.886 x 1.1 / 0.8) = 6
    assert decision.desired == 6
    policy.decide(at(301.0, 6, 10.0))  # a burst
    assert policy.slope(302.0) == 0.0


def test_kv_budget_is_a_floor() -> None:
    policy = proactive(kv_tokens_per_engine=1000.0)
    engines = pods(4, in_flight_tokens=1000)
    decision = policy.decide(at(0.0, 1, 0.0, engines=engines))
    assert (decision.desired, decision.reason) == (5, "scale_up")  # ceil(4 / 0.8)


def test_a_fresh_policy_waits_a_window_before_going_down() -> None:
    decision = proactive().decide(at(0.0, 10, 0.0))
    assert (decision.desired, decision.reason) == (10, "stabilising")


def test_stale_holds_and_records_nothing() -> None:
    policy = proactive()
    assert policy.decide(at(0.0, 3, 50.0, stale=True)) == Decision(desired=3, reason="stale")
    # no demand recorded: a calm fleet holds
    assert policy.decide(at(1.0, 3, 2.0)).reason == "hold"


@pytest.mark.parametrize(
    "settings",
    [
        {"fast_window_s": 30.0, "short_window_s": 20.0},
        {"short_window_s": 90.0},
        {"target_utilisation": 0.5, "hysteresis": 0.5},
    ],
)
def test_settings_validation(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProactiveSettings(**settings)
