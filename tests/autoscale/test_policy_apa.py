"""APAPolicy against AIBrix's documented APA: tolerance bands, the 2x / half caps, the 10 s
evaluation, the windowed average and the 300 s scale-down cooldown."""

from __future__ import annotations

from typing import Any

import pytest

from autoscale.policies.apa import REASONS, APAPolicy, APASettings
from tests.autoscale.helpers import kv_pods, obs, pods, waiting_pods


def apa(**settings: Any) -> APAPolicy:
    return APAPolicy(APASettings(**settings))


@pytest.mark.parametrize(
    ("kv", "desired", "reason"),
    [
        # r = 1.05 and 0.95: inside the 0.1 bands
        ([0.525, 0.525], 2, "tolerance"),
        ([0.475, 0.475], 2, "tolerance"),
        # r = 1.2: ceil(2 x 1.2) = 3
        ([0.6, 0.6], 3, "scale_up"),
        # r = 5: ceil(10) capped at ceil(2 x 2) = 4
        ([2.5, 2.5], 4, "scale_up"),
        # r = 0.6: ceil(4 x 0.6) = 3
        ([0.3] * 4, 3, "scale_down"),
        # r = 0.1: ceil(0.4) = 1 floored at floor(4 / 2) = 2
        ([0.05] * 4, 2, "scale_down"),
        # a pod without the gauge is left out of the average
        ([0.6, None], 3, "scale_up"),
        ([None, None], None, "no_data"),
    ],
)
def test_bands_and_caps(kv: list[float | None], desired: int | None, reason: str) -> None:
    current = len(kv)
    decision = apa().decide(obs(0.0, current, kv_pods(kv)))
    assert (decision.desired, decision.reason) == (desired or current, reason)
    assert decision.reason in REASONS


def test_waiting_metric_with_its_default_target() -> None:
    policy = apa(metric="waiting")
    assert policy.settings.effective_target == 5.0
    assert policy.decide(obs(0.0, 2, waiting_pods([10.0, 10.0]))).desired == 4


def test_evaluates_every_ten_seconds_and_holds_between() -> None:
    policy = apa()
    assert policy.decide(obs(0.0, 2, kv_pods([0.6, 0.6]))).desired == 3
    for t in range(1, 10):
        decision = policy.decide(obs(float(t), 3, kv_pods([0.9] * 3)))
        assert (decision.desired, decision.reason) == (3, "hold")
    # t = 10: the window averages 0.6 once and 0.9 nine times -> r = 1.74, ceil(5.2) = 6
    decision = policy.decide(obs(10.0, 3, kv_pods([0.9] * 3)))
    assert (decision.desired, decision.reason) == (6, "scale_up")


def test_the_window_averages_a_spike_away() -> None:
    policy = apa(eval_period_s=10.0)
    for t in range(0, 10):
        policy.decide(obs(float(t), 2, kv_pods([0.5, 0.5])))
    # one second at 1.0 after ten at 0.5: (10 x 0.5 + 1.0) / 11 = 0.545 -> r 1.09: hold
    decision = policy.decide(obs(10.0, 2, kv_pods([1.0, 1.0])))
    assert (decision.desired, decision.reason) == (2, "tolerance")


def test_scale_down_waits_for_the_cooldown_after_the_last_change() -> None:
    policy = apa()
    assert policy.decide(obs(0.0, 2, kv_pods([0.6, 0.6]))).reason == "scale_up"
    low = kv_pods([0.1] * 3)
    decisions = {t: policy.decide(obs(float(t), 3, low)) for t in range(1, 301)}
    assert {decisions[t].reason for t in range(10, 300, 10)} == {"cooldown"}
    assert all(decisions[t].desired == 3 for t in range(1, 300))
    # t = 300: 300 s after the scale-up; the 180 s window holds only 0.1: r = 0.2 ->
    # ceil(0.6) = 1, floored at floor(3 / 2) = 1
    assert (decisions[300].desired, decisions[300].reason) == (1, "scale_down")


def test_scale_up_cooldown_when_configured() -> None:
    policy = apa(scale_up_cooldown_s=30.0, window_s=1.0)
    assert policy.decide(obs(0.0, 2, kv_pods([0.6, 0.6]))).reason == "scale_up"
    assert policy.decide(obs(10.0, 3, kv_pods([0.9] * 3))).reason == "cooldown"
    assert policy.decide(obs(30.0, 3, kv_pods([0.9] * 3))).reason == "scale_up"


def test_pods_still_starting_do_not_turn_a_scale_up_into_a_scale_down() -> None:
    # spec 4, 2 ready at r = 1.2: ceil(2 x 1.2) = 3 < 4, the 2 starting pods will help
    engines = kv_pods([0.6, 0.6]) + pods(2, ready=False, prefix="new")
    decision = apa().decide(obs(0.0, 4, engines))
    assert (decision.desired, decision.reason) == (4, "pending")


def test_a_scale_down_that_lands_on_current_holds() -> None:
    # spec 3 with 4 ready pods (one being removed) at r = 0.7: ceil(2.8) = 3 = spec
    decision = apa().decide(obs(0.0, 3, kv_pods([0.35] * 4)))
    assert (decision.desired, decision.reason) == (3, "hold")


def test_stale_holds() -> None:
    decision = apa().decide(obs(0.0, 2, kv_pods([0.9, 0.9]), stale=True))
    assert (decision.desired, decision.reason) == (2, "stale")


def test_defaults_are_aibrix() -> None:
    s = APASettings()
    assert (s.metric, s.effective_target, s.up_tolerance, s.down_tolerance) == (
        "kv",
        0.5,
        0.1,
        0.1,
    )
    assert (s.max_scale_up_rate, s.max_scale_down_rate, s.eval_period_s) == (2.0, 2.0, 10.0)
    assert (s.window_s, s.scale_down_cooldown_s, s.scale_up_cooldown_s) == (180.0, 300.0, 0.0)
