from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from routing.registry import builtin_policies
from routing.scorers.prefix_cache import PrefixCacheCost
from routing.types import RouteRequest
from tests.routing.helpers import ep, eps

COST = PrefixCacheCost(prefill_s_per_token=1e-4, decode_s_per_request=1e-3, recompute_weight=0)


def req(prompt: int, blocks: dict[str, int] | None = None, seq: int = 0) -> RouteRequest:
    return RouteRequest(
        model="m",
        seq=seq,
        prompt_tokens=prompt,
        block_tokens=16,
        block_hashes=tuple(range(prompt // 16)),
        prefix_blocks=blocks or {},
    )


@pytest.mark.parametrize(
    ("endpoint_kw", "blocks", "expected_first"),
    [
        # the warm endpoint wins when otherwise equal
        ([{}, {}], {"e1": 100}, "e1"),
        # the warm endpoint still wins with a small queue
        ([{}, {"in_flight": 3, "prefill_tokens": 500}], {"e1": 100}, "e1"),
        # but not with a queue of prefill work larger than the saving
        ([{}, {"in_flight": 8, "prefill_tokens": 4000}], {"e1": 100}, "e0"),
        # KV pressure pushes away from an otherwise warm endpoint
        ([{}, {"kv_usage": 1.0}], {"e1": 50}, "e0"),
        # cold: least queued prefill work wins
        ([{"prefill_tokens": 100}, {}], {}, "e1"),
        # cold: fewer requests in flight wins
        ([{"in_flight": 2}, {"running": 1}], {}, "e1"),
        # the longer match wins
        ([{}, {}], {"e0": 20, "e1": 90}, "e1"),
    ],
)
def test_cost_model_decisions(
    endpoint_kw: list[dict[str, Any]], blocks: dict[str, int], expected_first: str
) -> None:
    endpoints = [ep(f"e{i}", **kw) for i, kw in enumerate(endpoint_kw)]
    scores = COST.score(req(2000, blocks), endpoints)
    best = max(range(len(scores)), key=lambda i: scores[i])
    assert endpoints[best].id == expected_first
    assert max(scores) == 1.0


@pytest.mark.parametrize(
    ("prompt", "blocks", "cached", "uncached"),
    [(2000, 100, 1600, 400), (100, 100, 100, 0), (0, 0, 0, 0), (2000, 0, 0, 2000)],
)
def test_estimate_breakdown(prompt: int, blocks: int, cached: int, uncached: int) -> None:
    r = RouteRequest(model="m", prompt_tokens=prompt, block_tokens=16, prefix_blocks={"e0": blocks})
    est = COST.estimate(r, ep("e0", prefill_tokens=1000, in_flight=2, kv_usage=0.9))
    assert (est.cached_tokens, est.uncached_tokens) == (cached, uncached)
    assert est.queue_s == pytest.approx((1000 + uncached) * 1e-4)
    assert est.load_s == pytest.approx(2e-3)
    assert est.kv_s == pytest.approx(0.5)
    assert est.total_s == pytest.approx(est.queue_s + est.load_s + est.kv_s)
    assert "e0:hit=" in est.describe()


def test_block_hashes_bound_the_prompt_size() -> None:
    r = RouteRequest(model="m", prompt_tokens=0, block_tokens=16, block_hashes=(1, 2, 3))
    assert COST.estimate(r, ep("e0")).uncached_tokens == 48


@pytest.mark.parametrize(
    "kw",
    [
        {"prefill_s_per_token": -1.0},
        {"decode_s_per_request": -1.0},
        {"kv_threshold": 1.0},
        {"recompute_weight": -0.5},
    ],
)
def test_invalid_params(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrefixCacheCost(**kw)  # type: ignore[arg-type]


def test_cold_ties_spread_like_least_request() -> None:
    policy = builtin_policies()["prefix-cache"]()
    endpoints = eps(4)
    first = Counter(policy.choose(req(1000, seq=s), endpoints).ranked[0].id for s in range(400))
    assert set(first) == {"e0", "e1", "e2", "e3"}
    assert min(first.values()) > 60  # roughly uniform, never piled on one


def test_explain_names_every_endpoint() -> None:
    policy = builtin_policies()["prefix-cache"]()
    decision = policy.choose(req(1000, {"e1": 10}), eps(2), explain=True)
    assert decision.details and "e0:hit=0" in decision.details[0]
    assert "e1:hit=160" in decision.details[0]
    assert decision.ranked[0].id == "e1"
    assert policy.choose(req(1000), eps(2)).details == ()


@pytest.mark.parametrize(
    ("weight", "expected_first"),
    [(0.0, "e0"), (1.0, "e1"), (3.0, "e1")],
)
def test_recompute_weight_makes_warm_endpoints_stickier(weight: float, expected_first: str) -> None:
    # e1 holds 1600 of 2000 tokens but has 2500 prefill tokens queued; e0 is idle and cold.
    cost = PrefixCacheCost(
        prefill_s_per_token=1e-4, decode_s_per_request=0, recompute_weight=weight
    )
    endpoints = [ep("e0"), ep("e1", prefill_tokens=2500)]
    scores = cost.score(req(2000, {"e1": 100}), endpoints)
    assert endpoints[scores.index(max(scores))].id == expected_first


def _recent(share: float) -> dict[str, Any]:
    return {"recent_routed": share * 100, "last_routed_seq": 50}


@pytest.mark.parametrize(
    ("endpoint_kw", "blocks", "expected_first"),
    [
        # warm everywhere (a shared system prompt), equal queues: the one holding less of
        # the recent traffic takes the new session
        (
            [{"in_flight": 5, **_recent(0.4)}, {"in_flight": 5, **_recent(0.1)}],
            {"e0": 30, "e1": 30},
            "e1",
        ),
        # nothing in flight: imbalance costs nothing, the term is 0 and the longer match wins
        ([_recent(0.9), _recent(0.1)], {"e0": 40, "e1": 30}, "e0"),
        # a long warm prefix keeps its engine despite holding 64 % of the recent traffic
        ([{"in_flight": 5, **_recent(0.45)}, {"in_flight": 5, **_recent(0.25)}], {"e0": 120}, "e0"),
    ],
)
def test_balance_term_steers_only_near_ties(
    endpoint_kw: list[dict[str, Any]], blocks: dict[str, int], expected_first: str
) -> None:
    endpoints = [ep(f"e{i}", **kw) for i, kw in enumerate(endpoint_kw)]
    scores = PrefixCacheCost().score(req(2000, blocks, seq=50), endpoints)
    assert endpoints[scores.index(max(scores))].id == expected_first


def test_balance_term_is_off_when_zero() -> None:
    endpoints = [ep("e0", in_flight=5, **_recent(0.4)), ep("e1", in_flight=5, **_recent(0.1))]
    costs = PrefixCacheCost(balance_s=0).score(req(2000, {"e0": 30, "e1": 30}, seq=50), endpoints)
    assert costs[0] == costs[1]
