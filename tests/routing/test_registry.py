from __future__ import annotations

from typing import Any

import pytest

from routing import NoEndpointError
from routing.filters import NotSaturated
from routing.pickers import PowerOfTwoPicker
from routing.registry import (
    ProfileError,
    build_policies,
    build_profile,
    builtin_plugins,
    builtin_policies,
)
from routing.scorers.prefix_cache import PrefixCacheCost
from routing.types import RouteRequest
from tests.routing.helpers import ep, eps

REQUIRED = {
    "random",
    "round-robin",
    "least-request",
    "least-kv-cache",
    "least-latency",
    "throughput",
    "power-of-two",
    "session-affinity",
    "prefix-cache",
    "fairness",
}


def test_builtin_policies_cover_the_required_set() -> None:
    policies = build_policies(builtin_policies())
    assert REQUIRED <= set(policies)
    for name, policy in policies.items():
        assert policy.name == name
        decision = policy.choose(RouteRequest(model="m", seq=3, user="u"), eps(3))
        assert len(decision.ranked) == 3


def test_least_kv_cache_policy_prefers_free_cache() -> None:
    policy = builtin_policies()["least-kv-cache"]()
    assert (
        policy.choose(RouteRequest(model="m"), [ep("a", kv_usage=0.9), ep("b")]).ranked[0].id == "b"
    )


def test_throughput_policy_balances_tokens() -> None:
    policy = builtin_policies()["throughput"]()
    endpoints = [
        ep("a", in_flight=1, in_flight_tokens=9000),
        ep("b", in_flight=3, in_flight_tokens=900),
    ]
    assert policy.choose(RouteRequest(model="m"), endpoints).ranked[0].id == "b"


def test_least_latency_policy() -> None:
    policy = builtin_policies()["least-latency"]()
    endpoints = [ep("a", ttft_ewma_s=0.5), ep("b", ttft_ewma_s=0.1)]
    assert policy.choose(RouteRequest(model="m", max_tokens=1), endpoints).ranked[0].id == "b"


def test_build_profile_full_spec() -> None:
    policy = build_profile(
        "mine",
        {
            "filters": ["healthy", {"type": "saturation", "max_waiting": 8}],
            "scorers": [
                {"type": "prefix-cache", "weight": 3, "prefill_s_per_token": 1e-4},
                {"type": "least-kv-cache"},
                "least-request",
            ],
            "picker": {"type": "power-of-two"},
        },
    )
    assert policy.name == "mine"
    assert isinstance(policy.filters[1], NotSaturated) and policy.filters[1].max_waiting == 8
    scorer, weight = policy.scorers[0]
    assert isinstance(scorer, PrefixCacheCost) and weight == 3.0
    assert scorer.prefill_s_per_token == 1e-4
    assert [w for _, w in policy.scorers] == [3.0, 1.0, 1.0]
    assert isinstance(policy.picker, PowerOfTwoPicker)


def test_build_profile_defaults() -> None:
    policy = build_profile("d", {})
    assert [f.name for f in policy.filters] == ["healthy", "serves-model"]
    assert policy.scorers == () and policy.picker.name == "max-score"


def test_shed_profile_raises_no_endpoint() -> None:
    policy = build_profile("s", {"filters": [{"type": "saturation", "shed": True}]})
    with pytest.raises(NoEndpointError) as info:
        policy.choose(RouteRequest(model="m"), [ep("a", waiting=100)])
    assert info.value.reason == "saturation"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"scorers": [{"type": "nope"}]}, "unknown type 'nope'"),
        ({"scorers": [{"weight": 1}]}, "expected a type name"),
        ({"scorers": [{"type": "prefix-cache", "bogus": 1}]}, "scorer #0 (prefix-cache)"),
        ({"scorers": [{"type": "prefix-cache", "kv_threshold": 2.0}]}, "kv_threshold"),
        ({"scorers": [{"type": "least-request", "weight": -1}]}, "weight must be"),
        ({"scorers": [{"type": "least-request", "weight": True}]}, "weight must be"),
        ({"scorers": [{"type": "least-request", "name": "x"}]}, "'name' is not"),
        ({"filters": "healthy"}, "must be lists"),
        ({"picker": 3}, "picker"),
        ({"pickers": "max-score"}, "unknown keys"),
        ({"filters": ["nope"]}, "filter #0"),
    ],
)
def test_build_profile_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match="profile 'p'") as info:
        build_profile("p", spec)
    assert message in str(info.value)


def test_plugin_tables_are_consistent() -> None:
    plugins = builtin_plugins()
    for table in (plugins.filters, plugins.scorers, plugins.pickers):
        for type_name, ctor in table.items():
            assert ctor().name == type_name


def test_explain_includes_filter_drops() -> None:
    policy = build_profile("x", {"filters": ["healthy"], "scorers": ["prefix-cache"]})
    decision = policy.choose(
        RouteRequest(model="m"), [ep("a"), ep("b", healthy=False)], explain=True
    )
    assert decision.details[0] == "healthy:kept=1/2"
    assert decision.details[1].startswith("prefix-cache:a:hit=0")


def test_decision_explain_header() -> None:
    policy = builtin_policies()["least-request"]()
    decision = policy.choose(RouteRequest(model="m"), [ep("a", in_flight=1), ep("b")])
    assert decision.explain() == "least-request;b=1.000,a=0.000"
    assert type(decision)(ranked=decision.ranked, policy="p").explain() == "p"
