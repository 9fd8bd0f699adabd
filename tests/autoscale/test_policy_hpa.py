"""HPAPolicy against the documented behaviour of the Kubernetes HPA (replica_calculator.go and
horizontal.go, defaults of reference section 1), with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscale.policies.hpa import REASONS, HPAPolicy, HPASettings
from autoscale.signals import EngineSignals
from tests.autoscale.helpers import kv_pods, obs, pods, run, waiting_pods


def hpa(**settings: Any) -> HPAPolicy:
    """An HPA without the metric delay (the idealised controller) unless asked for."""
    settings.setdefault("metric_delay_s", 0.0)
    return HPAPolicy(HPASettings(**settings))


@pytest.mark.parametrize(
    ("waiting", "current", "desired", "reason"),
    [
        # ratio 1.05 and 0.95: inside the 0.1 tolerance, nothing changes
        ([5.25, 5.25], 2, 2, "tolerance"),
        ([4.75, 4.75], 2, 2, "tolerance"),
        ([5.45, 5.45], 2, 2, "tolerance"),  # 1.09: still within
        # ratio 1.2: ceil(2 x 1.2) = 3
        ([6.0, 6.0], 2, 3, "scale_up"),
        ([10.0, 10.0], 2, 4, "scale_up"),
        # the average per pod, not the total: 3 pods at 0, 10, 20 average 10 -> 6
        ([0.0, 10.0, 20.0], 3, 6, "scale_up"),
        # far over target: limited to max(+4 pods, +100 %) per 15 s
        ([50.0, 50.0], 2, 6, "rate_limited"),  # max(2 + 4, 2 x 2) = 6
        ([50.0] * 10, 10, 20, "rate_limited"),  # max(10 + 4, 10 x 2) = 20
        # below target on a fresh HPA: the down window starts with the current replicas
        ([0.0, 0.0], 2, 2, "stabilising"),
    ],
)
def test_first_sync(waiting: list[float], current: int, desired: int, reason: str) -> None:
    decision = hpa().decide(obs(0.0, current, waiting_pods(waiting)))
    assert (decision.desired, decision.reason) == (desired, reason)
    assert decision.reason in REASONS


def test_decides_only_every_sync_period_and_holds_the_last_decision_between() -> None:
    policy = hpa()
    first = policy.decide(obs(0.0, 2, waiting_pods([10.0] * 2)))
    assert (first.desired, first.reason) == (4, "scale_up")
    # t = 1..14: the t = 0 decision, held, although the metric now asks for 8
    high = waiting_pods([10.0] * 4)
    decisions = run(policy, [obs(float(t), 4, high) for t in range(1, 16)])
    assert {(d.desired, d.reason) for d in decisions[:14]} == {(4, "hold")}
    assert (decisions[14].desired, decisions[14].reason) == (8, "scale_up")


def test_scale_up_limit_counts_the_changes_made_within_the_period() -> None:
    # sync every 5 s, policies per 15 s: a second scale-up within the period starts from the
    # replicas at the start of the period
    policy = hpa(sync_period_s=5.0)
    first = policy.decide(obs(0.0, 1, waiting_pods([100.0])))
    assert (first.desired, first.reason) == (5, "rate_limited")  # max(1 + 4, 1 x 2)
    again = policy.decide(obs(5.0, 5, waiting_pods([100.0] * 5)))
    assert (again.desired, again.reason) == (5, "rate_limited")  # period start 1: limit 5
    later = policy.decide(obs(15.0, 5, waiting_pods([100.0] * 5)))
    assert (later.desired, later.reason) == (10, "rate_limited")  # t=0 event out: max(9, 10)


def test_down_stabilisation_keeps_the_highest_recommendation_for_five_minutes() -> None:
    policy = hpa()
    assert policy.decide(obs(0.0, 4, waiting_pods([5.0] * 4))).reason == "tolerance"
    # t = 15: one pod's worth less (rec 3), then t = 30.. : rec 2
    decisions = {}
    for t in range(15, 316, 15):
        waiting = [3.75] * 4 if t == 15 else [2.5] * 4
        decisions[t] = policy.decide(obs(float(t), 4, waiting_pods(waiting)))
    assert all(decisions[t] == decisions[15] for t in range(15, 300, 15))
    assert (decisions[15].desired, decisions[15].reason) == (4, "stabilising")
    # t = 300: the t = 0 recommendation (4) left the window, t = 15's (3) is the highest
    assert (decisions[300].desired, decisions[300].reason) == (3, "scale_down")
    # t = 315: only 2s remain (the 3 at t = 15 is out)
    assert (decisions[315].desired, decisions[315].reason) == (2, "scale_down")


def test_down_without_stabilisation_is_limited_by_min_replicas() -> None:
    policy = hpa(scale_down_stabilisation_s=0.0)
    decision = policy.decide(obs(0.0, 4, waiting_pods([0.0] * 4)))
    assert (decision.desired, decision.reason) == (1, "rate_limited")  # 0, floored at 1
    at_min = policy.decide(obs(15.0, 1, waiting_pods([0.0])))
    assert (at_min.desired, at_min.reason) == (1, "hold")


def test_scale_down_percent_policy() -> None:
    policy = hpa(scale_down_stabilisation_s=0.0, scale_down_percent=50.0)
    decision = policy.decide(obs(0.0, 8, waiting_pods([1.0] * 8)))
    assert (decision.desired, decision.reason) == (4, "rate_limited")  # ceil(1.6) = 2 < 4


def test_scale_down_limit_zero_holds() -> None:
    policy = hpa(scale_down_stabilisation_s=0.0, scale_down_percent=0.0, min_replicas=0)
    decision = policy.decide(obs(0.0, 4, waiting_pods([1.0] * 4)))
    assert (decision.desired, decision.reason) == (4, "rate_limited")


def test_max_replicas_caps_the_scale_up() -> None:
    decision = hpa(max_replicas=3).decide(obs(0.0, 2, waiting_pods([20.0, 20.0])))
    assert (decision.desired, decision.reason) == (3, "rate_limited")


def test_up_stabilisation_takes_the_lowest_recommendation() -> None:
    policy = hpa(scale_up_stabilisation_s=30.0, sync_period_s=15.0)
    assert policy.decide(obs(0.0, 2, waiting_pods([5.0, 5.0]))).desired == 2
    decision = policy.decide(obs(15.0, 2, waiting_pods([10.0, 10.0])))
    assert (decision.desired, decision.reason) == (2, "stabilising")


def _ready_and_starting(
    ready: list[float], starting: int, *, metric: str = "waiting"
) -> tuple[EngineSignals, ...]:
    if metric == "waiting":
        ups = waiting_pods(ready)
    else:
        ups = kv_pods(ready)
    return ups + pods(starting, ready=False, prefix="new")


@pytest.mark.parametrize(
    ("ready", "starting", "current", "desired", "reason"),
    [
        # 2 ready pods at ratio 2 and 2 starting: the starting ones count 0 on a scale-up,
        # (10 + 10 + 0 + 0) / 4 = 5: ratio 1, hold (without them: 4)
        ([10.0, 10.0], 2, 4, 4, "tolerance"),
        ([10.0, 10.0], 0, 2, 4, "scale_up"),
        # ratio 3 damped to 1.5: ceil(1.5 x 4) = 6, not ceil(3 x 2) + 2 starting = 8
        ([15.0, 15.0], 2, 4, 6, "scale_up"),
        # the damped count would lower spec.replicas: hold (desired 3 < current 5)
        ([15.0], 1, 5, 5, "tolerance"),
        # a scale-down with starting pods counts them at the target
        ([0.0, 0.0], 2, 4, 4, "stabilising"),
    ],
)
def test_not_ready_pods_damp_the_scale_up(
    ready: list[float], starting: int, current: int, desired: int, reason: str
) -> None:
    engines = _ready_and_starting(ready, starting)
    decision = hpa().decide(obs(0.0, current, engines))
    assert (decision.desired, decision.reason) == (desired, reason)


@pytest.mark.parametrize(
    ("kv", "current", "desired", "reason"),
    [
        # scale-down: the two pods without a KV gauge count at the target (0.5):
        # (0.1 + 0.1 + 0.5 + 0.5) / 4 / 0.5 = 0.6 -> ceil(2.4) = 3 (not ceil(0.2 x 2) = 1)
        ([0.1, 0.1, None, None], 4, 3, "scale_down"),
        # scale-up: they count 0: (1 + 1 + 0 + 0) / 4 / 0.5 = 1 -> hold
        ([1.0, 1.0, None, None], 4, 4, "tolerance"),
        # the re-count flips the direction (1.2 -> 0.6): hold
        ([0.6, None], 2, 2, "tolerance"),
        # a recount below target that would still raise spec.replicas: hold
        ([0.2, None], 1, 1, "tolerance"),
        # no pod reports the metric: no decision
        ([None, None], 2, 2, "no_data"),
    ],
)
def test_missing_metrics(kv: list[float | None], current: int, desired: int, reason: str) -> None:
    policy = hpa(metric="kv", scale_down_stabilisation_s=0.0, tolerance_down=0.0)
    decision = policy.decide(obs(0.0, current, kv_pods(kv)))
    assert (decision.desired, decision.reason) == (desired, reason)


def test_kv_metric_targets_half_the_cache_by_default() -> None:
    policy = hpa(metric="kv")
    assert policy.name == "hpa-kv"
    assert policy.settings.effective_target == 0.5
    assert policy.decide(obs(0.0, 2, kv_pods([0.9, 0.9]))).desired == 4


def test_per_direction_tolerance() -> None:
    policy = hpa(tolerance_up=0.5)
    decision = policy.decide(obs(0.0, 2, waiting_pods([7.0, 7.0])))  # ratio 1.4
    assert (decision.desired, decision.reason) == (2, "tolerance")


def test_metric_delay_sees_the_values_of_delay_seconds_ago() -> None:
    policy = HPAPolicy(HPASettings(metric="waiting"))  # default delay 15 s
    assert policy.settings.metric_delay_s == 15.0
    low, high = waiting_pods([5.0, 5.0]), waiting_pods([20.0, 20.0])
    decisions = run(policy, [obs(float(t), 2, low if t < 10 else high) for t in range(0, 31)])
    assert (decisions[0].desired, decisions[0].reason) == (2, "no_data")  # nothing 15 s old
    # t = 15 sees t = 0 (low), although the queue has been high since t = 10
    assert (decisions[15].desired, decisions[15].reason) == (2, "tolerance")
    # t = 30 sees t = 15 (high): ratio 4 -> 8, limited to max(2 + 4, 4) = 6
    assert (decisions[30].desired, decisions[30].reason) == (6, "rate_limited")


def test_a_pod_new_since_the_delayed_snapshot_counts_as_missing() -> None:
    policy = HPAPolicy(HPASettings(metric="waiting", metric_delay_s=5.0))
    run(policy, [obs(float(t), 1, waiting_pods([10.0])) for t in range(0, 5)])
    two = waiting_pods([10.0, 10.0])
    decision = policy.decide(obs(15.0, 2, two))
    # one pod at ratio 2 plus a pod the delayed scrape has not seen (0 on a scale-up): 1 -> hold
    assert (decision.desired, decision.reason) == (2, "tolerance")


def test_stale_holds_without_recording() -> None:
    policy = hpa()
    decision = policy.decide(obs(0.0, 3, waiting_pods([50.0] * 3), stale=True))
    assert (decision.desired, decision.reason) == (3, "stale")
    # the stale tick did not start the sync period: the next fresh one decides
    assert policy.decide(obs(1.0, 3, waiting_pods([10.0] * 3))).reason == "scale_up"


def test_no_engines_means_no_data() -> None:
    assert hpa().decide(obs(0.0, 2)).reason == "no_data"


def test_settings_validation() -> None:
    with pytest.raises(ValidationError, match="max_replicas"):
        HPASettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        HPASettings(metric="cpu")  # type: ignore[arg-type]
