"""Table tests for the power-of-two picker and the saturation filter."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from routing.filters import NotSaturated
from routing.pickers import PowerOfTwoPicker, jitter
from routing.registry import builtin_policies
from routing.types import RouteRequest
from tests.routing.helpers import ep, eps


@pytest.mark.parametrize("seq", range(12))
def test_p2c_head_is_better_of_two_sampled(seq: int) -> None:
    endpoints = eps(5)
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    ranked = PowerOfTwoPicker().pick(RouteRequest(model="m", seq=seq), endpoints, scores)
    sampled = sorted(endpoints, key=lambda e: jitter(seq, e.id))[:2]
    best = max(sampled, key=lambda e: scores[endpoints.index(e)])
    assert ranked[0] is best
    assert set(ranked[:2]) == set(sampled)
    rest = [scores[endpoints.index(e)] for e in ranked[2:]]
    assert rest == sorted(rest, reverse=True)
    assert len(ranked) == 5


def test_p2c_never_picks_the_worst_and_spreads() -> None:
    endpoints = eps(4)
    scores = [1.0, 1.0, 1.0, 0.0]
    first = Counter(
        PowerOfTwoPicker().pick(RouteRequest(model="m", seq=s), endpoints, scores)[0].id
        for s in range(300)
    )
    assert "e3" not in first and len(first) == 3


def test_p2c_single_endpoint() -> None:
    only = [ep("x")]
    assert PowerOfTwoPicker().pick(RouteRequest(model="m"), only, [0.0]) == only


def test_p2c_policy_prefers_less_loaded() -> None:
    policy = builtin_policies()["power-of-two"]()
    endpoints = [ep("a", in_flight=10), ep("b", in_flight=0)]
    assert all(
        policy.choose(RouteRequest(model="m", seq=s), endpoints).ranked[0].id == "b"
        for s in range(10)
    )


@pytest.mark.parametrize(
    ("kw", "params", "kept"),
    [
        ([{}, {"waiting": 6}], {}, ["e0"]),
        ([{}, {"kv_usage": 0.81}], {}, ["e0"]),
        ([{"waiting": 5}, {"kv_usage": 0.8}], {}, ["e0", "e1"]),
        ([{"waiting": 9}, {"waiting": 7}], {}, ["e0", "e1"]),  # all saturated: keep all
        ([{"waiting": 9}, {"waiting": 7}], {"shed": True}, []),
        ([{"waiting": 9}, {"waiting": 7}], {"max_waiting": 8}, ["e1"]),
        ([{"kv_usage": 0.95}], {"max_kv_usage": 0.99}, ["e0"]),
    ],
)
def test_saturation(kw: list[dict[str, Any]], params: dict[str, Any], kept: list[str]) -> None:
    endpoints = [ep(f"e{i}", **k) for i, k in enumerate(kw)]
    out = NotSaturated(**params).filter(RouteRequest(model="m"), endpoints)
    assert [e.id for e in out] == kept
