"""The registry: every name builds a fresh Policy from a mapping, unknown names and settings are
refused, every policy holds on stale metrics, and the signals' helpers."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

import autoscale.policies as policies
from autoscale import signals, window
from autoscale.policies import NAMES, apa, build, hpa, kpa, proactive, slo, static
from autoscale.signals import EngineSignals, Observation
from tests.autoscale.helpers import pods

POLICY_NAMES = ("hpa", "kpa", "apa", "proactive", "slo", "static")


def test_names() -> None:
    assert set(NAMES) == set(POLICY_NAMES)


def test_all_is_pinned() -> None:
    assert sorted(policies.__all__) == sorted(
        ["NAMES", "build", "scales_from_zero"]
        + [
            f"{kind}{suffix}"
            for kind in ("APA", "HPA", "KPA", "Proactive", "SLO", "Static")
            for suffix in ("Policy", "Settings")
        ]
    )
    for name in policies.__all__:
        assert hasattr(policies, name)
    assert sorted(signals.__all__) == ["Decision", "EngineSignals", "Observation", "Policy"]
    assert window.__all__ == ["SecondWindow"]


@pytest.mark.parametrize(
    ("name", "settings", "policy_name"),
    [
        ("hpa", None, "hpa-waiting"),
        ("hpa", {"metric": "kv"}, "hpa-kv"),
        ("hpa", {"metric": "waiting", "target": 3}, "hpa-waiting"),
        ("kpa", {"target": 24}, "kpa"),
        ("apa", {}, "apa"),
        ("proactive", {"lead_time_s": 60}, "proactive"),
        ("slo", {"ttft_slo_s": 2.0}, "slo"),
        ("static", {"replicas": 4}, "static"),
    ],
)
def test_build(name: str, settings: dict[str, Any] | None, policy_name: str) -> None:
    policy = build(name, settings)
    assert policy.name == policy_name
    assert build(name, settings) is not policy  # fresh windows each time


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown autoscaling policy 'cpu'"):
        build("cpu")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_unknown_setting_is_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        build(name, {"no_such_setting": 1})


def _busy(now: float, *, stale: bool) -> Observation:
    engines = pods(3, waiting=50.0, kv=0.99, in_flight=500, ttft=9.0, itl=1.0)
    return Observation(
        now=now,
        current=3,
        ready=3,
        engines=engines,
        arrival_rate=1000.0,
        prompt_token_rate=1e6,
        output_token_rate=1e5,
        stale=stale,
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_holds_on_stale_metrics(name: str) -> None:
    settings = (
        {"replicas": 9} if name == "static" else {"metric_delay_s": 0} if name == "hpa" else {}
    )
    policy = build(name, settings)
    decisions = [policy.decide(_busy(float(t), stale=True)) for t in range(0, 30)]
    assert {(d.desired, d.reason, d.panic) for d in decisions} == {(3, "stale", False)}
    # the same overload, fresh, moves every policy within two ticks (so the hold above is the
    # stale rule; one second is no evidence of a level for the proactive policy)
    fresh = [policy.decide(_busy(30.0 + t, stale=False)) for t in range(2)]
    assert max(d.desired for d in fresh) > 3


@pytest.mark.parametrize(
    ("engine", "concurrency"),
    [
        (EngineSignals(id="a", ready=True, in_flight=7, running=2.0, waiting=1.0), 7.0),
        (EngineSignals(id="a", ready=True, running=2.0, waiting=1.0), 3.0),
        (EngineSignals(id="a", ready=False), 0.0),
    ],
)
def test_engine_concurrency(engine: EngineSignals, concurrency: float) -> None:
    assert engine.concurrency == concurrency


@pytest.mark.parametrize(("current", "ready", "pending"), [(5, 3, 2), (3, 3, 0), (2, 4, 0)])
def test_observation_pending(current: int, ready: int, pending: int) -> None:
    assert Observation(now=0.0, current=current, ready=ready).pending == pending


def test_observation_totals() -> None:
    observation = Observation(
        now=0.0,
        current=2,
        ready=2,
        engines=pods(2, in_flight=3),
        prompt_token_rate=100.0,
        output_token_rate=20.0,
    )
    assert observation.concurrency == 6.0
    assert observation.token_rate == 120.0


VOCABULARIES = {
    "hpa": hpa.REASONS,
    "kpa": kpa.REASONS,
    "apa": apa.REASONS,
    "proactive": proactive.REASONS,
    "slo": slo.REASONS,
    "static": static.REASONS,
}
SCENARIO_SETTINGS: dict[str, dict[str, Any]] = {
    "hpa": {"metric_delay_s": 5},
    "kpa": {"target": 4},
    "proactive": {"prompt_tokens_per_s": 2000, "output_tokens_per_s": 500, "lead_time_s": 30},
    "slo": {"prompt_tokens_per_s": 2000, "output_tokens_per_s": 500, "lead_time_s": 30},
    "static": {"replicas": 4},
}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_reasons_stay_in_each_policys_vocabulary(name: str) -> None:
    """A seeded rough cluster (pods ready 30 s after they are asked for, load stepping up and
    down, a stale spell): every reason is one of the policy's fixed labels, every count >= 0."""
    rng = random.Random(3)
    policy = build(name, SCENARIO_SETTINGS.get(name))
    ready_at: list[float] = [0.0, 0.0]
    for t in range(0, 900):
        load = 2.0 if t < 200 or t >= 500 else 8.0
        arrivals = rng.expovariate(1.0) * load
        ready = sum(1 for r in ready_at if r <= t)
        per_pod = arrivals * 3 / max(1, ready)
        engines = tuple(
            EngineSignals(
                id=f"p{i}",
                ready=r <= t,
                waiting=per_pod,
                kv_usage=min(1.0, 0.1 * per_pod),
                in_flight=int(per_pod),
                ttft_s=0.2 * per_pod,
                itl_s=0.02,
                queued_prompt_tokens=int(300 * per_pod),
            )
            for i, r in enumerate(ready_at)
        )
        observation = Observation(
            now=float(t),
            current=len(ready_at),
            ready=ready,
            engines=engines,
            arrival_rate=arrivals,
            prompt_token_rate=arrivals * 1000,
            output_token_rate=arrivals * 100,
            stale=600 <= t < 620,
        )
        decision = policy.decide(observation)
        assert decision.reason in VOCABULARIES[name], (t, decision)
        assert decision.desired >= 0
        desired = min(decision.desired, 30)
        if desired > len(ready_at):
            ready_at += [t + 30.0] * (desired - len(ready_at))
        else:
            ready_at = sorted(ready_at)[:desired]
