"""Which policies scale a target up from zero replicas (docs/autoscaling.md, scaling from zero).

At zero replicas there is no pod: no in-flight requests, queues or KV usage, only the
arrivals the gateway counts (requests answered 503 ``no_healthy_endpoint`` included). So only
the policies that read the arrival and token rates can ask for a first replica: proactive, and
slo with its token capacities (the proactive model inside). hpa (as kube-controller-manager
does: scaling is disabled at 0 replicas), kpa and apa scale on per-pod signals and stay at 0;
static asks for its fixed count whatever the load.
"""

from __future__ import annotations

from typing import Any

import pytest

from autoscale.policies import build, scales_from_zero
from autoscale.settings import AutoscalingSettings
from autoscale.signals import Observation

TICKS = 30  # simulated seconds of steady arrivals


def _first_scale_up(name: str, settings: dict[str, Any], arrival_rate: float) -> int | None:
    """The tick at which ``name`` first asks for a replica, from zero, under steady arrivals
    of 1,000 prompt and 256 expected output tokens each; None if it never does."""
    policy = build(name, settings)
    for tick in range(TICKS):
        obs = Observation(
            now=float(tick), current=0, ready=0, engines=(), arrival_rate=arrival_rate,
            prompt_token_rate=1000.0 * arrival_rate, output_token_rate=256.0 * arrival_rate,
        )  # fmt: skip
        if policy.decide(obs).desired > 0:
            return tick
    return None


CAPACITIES = {"prompt_tokens_per_s": 8000.0, "output_tokens_per_s": 2500.0}


@pytest.mark.parametrize(
    ("name", "settings", "scales"),
    [
        ("proactive", {}, True),
        ("slo", CAPACITIES, True),
        ("slo", {}, False),  # latency only: no engine, no latency
        ("static", {"replicas": 1}, True),  # not demand: its fixed count
        ("hpa", {}, False),
        ("hpa", {"metric": "kv"}, False),
        ("kpa", {"target": 1}, False),  # concurrency: 503s are never in flight
        ("apa", {}, False),
        ("apa", {"metric": "waiting"}, False),
    ],
)
def test_scaling_up_from_zero(name: str, settings: dict[str, Any], scales: bool) -> None:
    first = _first_scale_up(name, settings, arrival_rate=2.0)
    assert (first is not None) == scales, (name, settings, first)


@pytest.mark.parametrize("name", ["proactive", "slo"])
def test_no_arrivals_keep_zero(name: str) -> None:
    settings = CAPACITIES if name == "slo" else {}
    assert _first_scale_up(name, settings, arrival_rate=0.0) is None


@pytest.mark.parametrize(
    ("name", "settings", "scales"),
    [
        ("proactive", {}, True),
        ("slo", CAPACITIES, True),
        ("slo", {}, False),
        ("static", {"replicas": 1}, True),
        ("static", {"replicas": 0}, False),
        ("hpa", {}, False),
        ("kpa", {}, False),
        ("apa", {}, False),
    ],
)
def test_scales_from_zero_matches_the_policies(
    name: str, settings: dict[str, Any], scales: bool
) -> None:
    assert scales_from_zero(name, settings) is scales


@pytest.mark.parametrize(
    ("policy", "settings", "accepted"),
    [
        ("proactive", {}, True),
        ("slo", CAPACITIES, True),
        ("static", {"replicas": 0}, True),  # parked on purpose
        ("hpa", {}, True),  # its own floor (1) keeps it off zero
        ("hpa", {"min_replicas": 0}, False),
        ("kpa", {}, False),
        ("apa", {}, False),
        ("slo", {}, False),
    ],
)
def test_min_replicas_zero_needs_a_policy_that_comes_back(
    policy: str, settings: dict[str, Any], accepted: bool
) -> None:
    """A config that could strand the target at zero is refused at load, naming the fix."""
    raw = {"enabled": True, "target": {"name": "llama"}, "policy": policy,
           "policy_settings": settings, "min_replicas": 0}  # fmt: skip
    if accepted:
        assert AutoscalingSettings.model_validate(raw).min_replicas == 0
    else:
        with pytest.raises(ValueError, match="min_replicas 0 with policy"):
            AutoscalingSettings.model_validate(raw)
    # min_replicas 1 is always accepted, and a disabled section is not checked
    assert AutoscalingSettings.model_validate({**raw, "min_replicas": 1}).min_replicas == 1
    assert not AutoscalingSettings.model_validate({**raw, "enabled": False}).enabled


@pytest.mark.parametrize(
    ("policy", "settings", "min_replicas", "refused"),
    [
        ("proactive", {}, 0, True),  # scales from zero only embedded: no engine, no arrivals
        ("slo", CAPACITIES, 0, True),
        ("kpa", {}, 0, True),
        ("hpa", {"min_replicas": 0}, 0, True),
        ("hpa", {}, 0, False),  # its own floor (1) keeps it off zero
        ("static", {"replicas": 2}, 0, False),
        ("proactive", {}, 1, False),
    ],
)
def test_the_standalone_autoscaler_refuses_min_replicas_zero(
    policy: str, settings: dict[str, Any], min_replicas: int, refused: bool
) -> None:
    raw = {"target": {"name": "llama"}, "policy": policy, "policy_settings": settings,
           "min_replicas": min_replicas}  # fmt: skip
    problem = AutoscalingSettings.model_validate(raw).standalone_problem()
    assert (problem is not None and "min_replicas 0 with the standalone" in problem) == refused
    assert AutoscalingSettings.model_validate({"policy": policy, "policy_settings": settings}
                                              ).standalone_problem() == (
        "autoscaling.target.name is required"
    )  # fmt: skip
