"""KPAPolicy against Knative's documented KPA behaviour (stable/panic windows, panic threshold,
scale rates, 2 s tick), with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from autoscale.policies.kpa import REASONS, KPAPolicy, KPASettings
from autoscale.signals import Decision, EngineSignals, Observation


def at(now: float, concurrency: int, *, ready: int, current: int | None = None) -> Observation:
    """One engine carrying the fleet's in-flight count (KPA scales on the total)."""
    engine = EngineSignals(id="e", ready=True, in_flight=concurrency)
    return Observation(
        now=now, current=ready if current is None else current, ready=ready, engines=(engine,)
    )


def kpa(**settings: Any) -> KPAPolicy:
    settings.setdefault("target", 10.0)
    return KPAPolicy(KPASettings(**settings))


def steady(policy: KPAPolicy, concurrency: int, ready: int, until: int = 60) -> Decision:
    decision = None
    for t in range(until + 1):
        decision = policy.decide(at(float(t), concurrency, ready=ready))
    assert decision is not None
    return decision


@pytest.mark.parametrize(
    ("concurrency", "ready", "settings", "desired", "reason", "panic"),
    [
        (20, 2, {}, 2, "hold", False),
        # ceil(30 / 10) = 3: 3 / 2 = 1.5 < 2.0, no panic
        (30, 2, {}, 3, "scale_up", False),
        # ceil(31 / 10) = 4: 4 / 2 = 2.0 >= 2.0, panic
        (31, 2, {}, 4, "panic", True),
        # scale-down is limited to floor(ready / max_scale_down_rate) = 5
        (0, 10, {}, 5, "scale_down", False),
        (0, 10, {"max_scale_down_rate": 5.0}, 2, "scale_down", False),
        # scale-up is limited to ceil(max_scale_up_rate x ready)
        (10_000, 1, {}, 1000, "panic", True),
        (10_000, 1, {"max_scale_up_rate": 2.0}, 2, "panic", True),
        (10_000, 3, {"max_scale_up_rate": 1.5}, 5, "scale_up", False),  # 5 / 3 < 2
        # no ready pod counts as one
        (5, 0, {}, 1, "scale_up", False),
    ],
)
def test_steady_load(
    concurrency: int,
    ready: int,
    settings: dict[str, Any],
    desired: int,
    reason: str,
    panic: bool,
) -> None:
    decision = steady(kpa(**settings), concurrency, ready)
    assert (decision.desired, decision.reason, decision.panic) == (desired, reason, panic)
    assert decision.reason in REASONS


def test_panic_enters_on_the_panic_window_holds_the_max_and_leaves_after_a_stable_window() -> None:
    policy = kpa()
    # 20 in flight on 2 pods for a minute, then 100 for 10 s (t = 60..69), then 20 again;
    # the pods asked for never turn ready (ready stays 2)
    load = {t: 100 if 60 <= t < 70 else 20 for t in range(0, 200)}
    decisions = {t: policy.decide(at(float(t), load[t], ready=2)) for t in range(0, 200)}
    assert all(not decisions[t].panic for t in range(0, 60))
    # t = 60: the 6 s window holds one second at 100: (5 x 20 + 100) / 6 -> 4 pods, 4/2 >= 2
    assert (decisions[60].desired, decisions[60].reason, decisions[60].panic) == (4, "panic", True)
    # a full panic window at 100: 10 pods
    assert decisions[66].desired == 10
    # the last tick over the threshold is t = 74 (the window still holds t = 69);
    # panic lasts a stable window (60 s) after it, and never decreases meanwhile
    in_panic = [decisions[t] for t in range(60, 135)]
    assert all(d.panic for d in in_panic)
    desired = [d.desired for d in in_panic]
    assert desired == sorted(desired) and desired[-1] == 10
    # t = 136 is the first tick with 74 + 60 < now: back to the stable value ceil(20 / 10)
    assert (decisions[136].desired, decisions[136].reason, decisions[136].panic) == (
        2,
        "hold",
        False,
    )
    assert policy.panicking is False


def test_decides_every_two_seconds_and_holds_between() -> None:
    policy = kpa()
    first = policy.decide(at(0.0, 50, ready=5))
    assert (first.desired, first.reason) == (5, "hold")
    between = policy.decide(at(1.0, 100, ready=5))
    assert (between.desired, between.reason) == (5, "hold")
    tick = policy.decide(at(2.0, 100, ready=5))
    # stable: (50 + 100 + 100) / 3 -> 9; panic window the same
    assert (tick.desired, tick.reason) == (9, "scale_up")
    held = policy.decide(at(3.0, 100, ready=5))
    assert (held.desired, held.reason, held.panic) == (9, "hold", False)


def test_hold_between_ticks_keeps_the_panic_flag() -> None:
    policy = kpa()
    assert policy.decide(at(0.0, 100, ready=1)).panic
    assert policy.decide(at(1.0, 100, ready=1)).panic


def test_scale_down_delay_keeps_the_highest_desired_count_of_its_window() -> None:
    policy = kpa(scale_down_delay_s=10.0, stable_window_s=6.0)
    for t in range(0, 7):
        policy.decide(at(float(t), 40, ready=4))
    decisions = {t: policy.decide(at(float(t), 10, ready=4)) for t in range(7, 30)}
    # the stable window falls to ceil(10 / 10) = 1 within 6 s (at least floor(4 / 2) = 2),
    # but the delay keeps 4 for 10 s after the last tick that wanted 4
    assert decisions[14].desired == 4
    assert decisions[22].desired == 2


def test_concurrency_from_running_and_waiting_when_the_gateway_counts_nothing() -> None:
    policy = kpa()
    engines = (
        EngineSignals(id="a", ready=True, running=8.0, waiting=4.0),
        EngineSignals(id="b", ready=True, running=8.0, waiting=0.0, in_flight=20),
    )
    decision = policy.decide(Observation(now=0.0, current=2, ready=2, engines=engines))
    assert decision.desired == 4  # (8 + 4) + 20 = 32 -> ceil(3.2); 4 / 2 = 2.0: panic
    assert decision.panic


def test_stale_holds_and_records_nothing() -> None:
    policy = kpa()
    stale = Observation(now=0.0, current=3, ready=3, stale=True)
    assert policy.decide(stale) == Decision(desired=3, reason="stale")
    # the stale tick neither started the tick clock nor entered the window
    decision = policy.decide(at(1.0, 30, ready=3))
    assert (decision.desired, decision.reason) == (3, "hold")


def test_defaults_are_knatives() -> None:
    s = KPASettings()
    assert (s.target, s.stable_window_s, s.panic_window_s, s.panic_threshold) == (
        70.0,
        60.0,
        6.0,
        2.0,
    )
    assert (s.max_scale_up_rate, s.max_scale_down_rate, s.tick_s) == (1000.0, 2.0, 2.0)
