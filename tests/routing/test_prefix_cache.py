from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from routing.pickers.basic import MaxScorePicker
from routing.policy import Policy
from routing.registry import builtin_policies
from routing.scorers.prefix_cache import PrefixCacheCost
from routing.state import EngineState
from routing.types import RouteRequest, is_placement
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


def test_balance_terms_are_off_when_zero() -> None:
    endpoints = [
        ep("e0", in_flight=5, **_recent(0.4), recent_placed=30),
        ep("e1", in_flight=5, **_recent(0.1), recent_placed=5),
    ]
    off = PrefixCacheCost(balance_s=0, placement_s=0)
    costs = off.score(req(2000, {"e0": 30, "e1": 30}, seq=50), endpoints)
    assert costs[0] == costs[1]


def _placed(share: float, **kw: Any) -> dict[str, Any]:
    """An endpoint that started ``share`` of the recent placements (no traffic imbalance)."""
    return {"recent_routed": 50, "recent_placed": share * 20, "last_routed_seq": 50, **kw}


@pytest.mark.parametrize(
    ("endpoint_kw", "blocks", "expected_first"),
    [
        # a new prefix (cold everywhere) goes where fewer sticky prefixes were started,
        # even with one small prefill queued there (placement 1.0 x 2 x 0.1 = 0.2 s > 0.09 s)
        ([_placed(0.4, prefill_tokens=1000), _placed(0.6)], {}, "e0"),
        # ... not behind a long queue (0.36 s of prefill)
        ([_placed(0.4, prefill_tokens=4000), _placed(0.6)], {}, "e1"),
        # warm everywhere on a shared prefix is still a placement (a new session)
        ([_placed(0.4, prefill_tokens=1000), _placed(0.6)], {"e0": 25, "e1": 25}, "e0"),
        # a follower (e1 holds more of the prompt) is not a placement: it keeps its engine
        ([_placed(0.1), _placed(0.9)], {"e1": 20}, "e1"),
        # nothing placed yet: least queued work, as for any cold request
        ([_placed(0.0, prefill_tokens=100), _placed(0.0)], {}, "e1"),
    ],
)
def test_placement_term_spreads_new_sticky_prefixes(
    endpoint_kw: list[dict[str, Any]], blocks: dict[str, int], expected_first: str
) -> None:
    endpoints = [ep(f"e{i}", **kw) for i, kw in enumerate(endpoint_kw)]
    scores = PrefixCacheCost(balance_s=0).score(req(2000, blocks, seq=50), endpoints)
    assert endpoints[scores.index(max(scores))].id == expected_first


def _place_groups(cost: PrefixCacheCost) -> list[int]:
    """16 prefix groups placed one by one while followers of earlier groups keep arriving
    unevenly (each request finishes before the next arrives); groups per endpoint."""
    states = {f"e{i}": EngineState(f"e{i}", f"http://e{i}") for i in range(4)}
    policy = Policy("p", filters=(), scorers=((cost, 1.0),), picker=MaxScorePicker())
    owner: dict[int, str] = {}
    seq = 0
    for group in range(16):
        for g in range(group):
            if g % 4 == 0:  # every fourth group is popular: its engine gets extra requests
                state = states[owner[g]]
                state.finish(state.begin(prompt_tokens=100, seq=seq))
                seq += 1
        rreq = req(2000, {}, seq=seq)
        chosen = policy.choose(rreq, [s.snapshot() for s in states.values()]).ranked[0].id
        placed = is_placement(rreq, states)
        states[chosen].finish(states[chosen].begin(prompt_tokens=2000, seq=seq, placed=placed))
        owner[group] = chosen
        seq += 1
    return sorted(Counter(owner.values()).values())


def test_placements_spread_groups_evenly_despite_uneven_followers() -> None:
    assert _place_groups(PrefixCacheCost()) == [4, 4, 4, 4]
    # without the placement term the least-recently-routed tie-break follows the followers
    assert _place_groups(PrefixCacheCost(placement_s=0)) != [4, 4, 4, 4]


@pytest.mark.parametrize(
    ("blocks", "ids", "expected"),
    [
        ({}, ["e0", "e1"], True),
        ({"e0": 3, "e1": 3}, ["e0", "e1"], True),
        ({"e0": 3}, ["e0", "e1"], False),
        ({"e0": 3, "e1": 1}, ["e0", "e1"], False),
        ({"e0": 3}, ["e0"], True),
        ({"e0": 3}, [], True),
    ],
)
def test_is_placement(blocks: dict[str, int], ids: list[str], expected: bool) -> None:
    assert is_placement(req(100, blocks), ids) is expected
