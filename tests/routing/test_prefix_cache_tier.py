"""The prefix-cache cost model with a shared KV tier (RouteRequest.tier_blocks)."""

from __future__ import annotations

from typing import Any

import pytest

from routing.registry import builtin_policies
from routing.scorers.prefix_cache import PrefixCacheCost
from routing.types import RouteRequest
from tests.routing.helpers import ep

COST = PrefixCacheCost(
    prefill_s_per_token=1e-4, tier_s_per_token=2e-5, decode_s_per_request=1e-3, recompute_weight=1
)


def req(prompt: int, blocks: dict[str, int], tier: int) -> RouteRequest:
    return RouteRequest(
        model="m",
        prompt_tokens=prompt,
        block_tokens=16,
        block_hashes=tuple(range(prompt // 16)),
        prefix_blocks=blocks,
        tier_blocks=tier,
    )


@pytest.mark.parametrize(
    ("prompt", "local", "tier", "cached", "fetched", "uncached"),
    [
        (2000, 0, 0, 0, 0, 2000),  # no tier: as before
        (2000, 50, 0, 800, 0, 1200),
        (2000, 0, 100, 0, 1600, 400),  # the tier makes 100 blocks warm everywhere
        (2000, 50, 100, 800, 800, 400),  # the tier supplies what the engine lacks
        (2000, 100, 50, 1600, 0, 400),  # the engine holds more than the tier: local only
        (2000, 0, 200, 0, 2000, 0),  # the tier's count is capped by the prompt
        (100, 0, 6, 0, 96, 4),
    ],
)
def test_estimate_splits_the_prompt(
    prompt: int, local: int, tier: int, cached: int, fetched: int, uncached: int
) -> None:
    est = COST.estimate(req(prompt, {"e0": local}, tier), ep("e0"))
    assert (est.cached_tokens, est.tier_tokens, est.uncached_tokens) == (cached, fetched, uncached)
    assert est.queue_s == pytest.approx(fetched * 2e-5 + uncached * 2e-4)
    assert f"tier={fetched}" in est.describe()


def test_fetch_cost_is_capped_by_recompute() -> None:
    slow_tier = PrefixCacheCost(prefill_s_per_token=1e-4, tier_s_per_token=1.0, recompute_weight=0)
    est = slow_tier.estimate(req(1600, {}, 100), ep("e0"))
    assert est.queue_s == pytest.approx(1600 * 1e-4)  # the engine's gate recomputes instead


@pytest.mark.parametrize(
    ("endpoint_kw", "local", "tier", "expected"),
    [
        # no tier: the warm but busier engine wins (its hit saves more than its queue costs)
        ([{"in_flight": 6, "prefill_tokens": 1500}, {}], {"e0": 120}, 0, "e0"),
        # the tier holds the prefix: warm everywhere, the idle engine wins
        ([{"in_flight": 6, "prefill_tokens": 1500}, {}], {"e0": 120}, 120, "e1"),
        # a partial tier hit: the local hit beyond it still decides
        ([{"in_flight": 1, "prefill_tokens": 100}, {}], {"e0": 120}, 20, "e0"),
        # cold everywhere and nothing in the tier: least queued work
        ([{"prefill_tokens": 300}, {}], {}, 0, "e1"),
        # everything in the tier, equal load: the local hit breaks the tie (saves the fetch)
        ([{}, {}], {"e1": 120}, 120, "e1"),
    ],
)
def test_tier_changes_the_decision(
    endpoint_kw: list[dict[str, Any]], local: dict[str, int], tier: int, expected: str
) -> None:
    endpoints = [ep(f"e{i}", **kw) for i, kw in enumerate(endpoint_kw)]
    scores = COST.score(req(2000, local, tier), endpoints)
    best = max(range(len(scores)), key=lambda i: scores[i])
    assert endpoints[best].id == expected


def test_builtin_policy_spreads_a_tier_held_prefix() -> None:
    policy = builtin_policies()["prefix-cache"]()
    hot = ep("e0", in_flight=8, prefill_tokens=4000, running=8)
    idle = [ep("e1"), ep("e2")]
    without = policy.choose(req(4000, {"e0": 250}, 0), [hot, *idle])
    with_tier = policy.choose(req(4000, {"e0": 250}, 250), [hot, *idle])
    assert without.ranked[0].id == "e0"
    assert with_tier.ranked[0].id in {"e1", "e2"}


def test_negative_tier_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="costs must be >= 0"):
        PrefixCacheCost(tier_s_per_token=-1.0)
